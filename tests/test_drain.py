"""Stopping an agent loses nothing: in-flight work finishes within the grace period or goes back to JetStream."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import anyio
import pytest

from dspyrt.bus import Message, TaskStatus
from dspyrt.runtime.agent import Agent, TaskContext, endpoint, task
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import hosting, wait_until

pytestmark = pytest.mark.timeout(60)


class Nap(Message):
    seconds: float


class Woke(Message):
    attempt: int


@dataclass
class Ledger:
    """What every instance of the agent did, across restarts."""

    started: Counter[str] = field(default_factory=Counter)
    done: Counter[str] = field(default_factory=Counter)


class Napper(Agent):
    name = "napper"

    def __init__(self, config: IntegrationConfig, ledger: Ledger) -> None:
        super().__init__(config)
        self.ledger = ledger

    @task("nap")
    async def nap(self, job: Nap, ctx: TaskContext) -> Woke:
        """Naps ``seconds`` on the first delivery; a redelivery wakes at once."""
        self.ledger.started[ctx.task_id] += 1
        await anyio.sleep(job.seconds if ctx.attempt == 1 else 0)
        self.ledger.done[ctx.task_id] += 1
        return Woke(attempt=ctx.attempt)

    @endpoint("doze")
    async def doze(self, job: Nap) -> Woke:
        self.ledger.started["doze"] += 1
        await anyio.sleep(job.seconds)
        self.ledger.done["doze"] += 1
        return Woke(attempt=0)


async def test_stop_finishes_tasks_in_flight_and_leaves_the_rest(config: IntegrationConfig, client: Client) -> None:
    config = config.model_copy(update={"agent_concurrency": 2, "shutdown_grace": 20.0})
    ledger = Ledger()
    ids = [(await client.submit("nap", Nap(seconds=1.0), require_worker=False)).task_id for _ in range(6)]

    async with hosting(Napper(config, ledger)) as first:
        await wait_until(lambda: sum(ledger.started.values()) == 2)
        in_flight = set(ledger.started)
    # the first instance is gone: what it had started it finished, the rest it never took
    for task_id in ids:
        record = await client.task(task_id)
        if task_id in in_flight:
            assert record.status is TaskStatus.SUCCEEDED
            assert record.worker == f"napper/{first.instance_id}"
        else:
            assert record.status is TaskStatus.PENDING
    assert await client.consumer_pending("nap") == 4

    async with hosting(Napper(config, ledger)) as second:
        records = [await client.result(task_id, timeout=30) for task_id in ids]
    assert [r.status for r in records] == [TaskStatus.SUCCEEDED] * 6
    assert all(r.attempts == 1 for r in records)
    assert {r.worker for r in records if r.id not in in_flight} == {f"napper/{second.instance_id}"}
    assert ledger.done == Counter({task_id: 1 for task_id in ids})
    assert ledger.started == ledger.done


async def test_task_past_the_grace_period_goes_back_to_the_queue(config: IntegrationConfig, client: Client) -> None:
    config = config.model_copy(update={"shutdown_grace": 0.2})
    ledger = Ledger()
    submission = await client.submit("nap", Nap(seconds=3.0), require_worker=False)
    async with hosting(Napper(config, ledger)):
        await wait_until(lambda: ledger.started[submission.task_id] == 1)
    # cut short by the stop, and handed back (nak) rather than left to its ack_wait
    assert ledger.done[submission.task_id] == 0
    assert await client.consumer_pending("nap") == 1

    async with hosting(Napper(config, ledger)):
        record = await client.result(submission.task_id, timeout=30)
    assert record.status is TaskStatus.SUCCEEDED
    assert record.attempts == 2
    assert record.result == {"attempt": 2}
    assert ledger.done[submission.task_id] == 1


async def test_stop_answers_requests_in_flight(config: IntegrationConfig, client: Client) -> None:
    ledger = Ledger()
    replies: list[Woke] = []

    async def ask() -> None:
        replies.append(await client.request("napper", "doze", Nap(seconds=2.0), Woke, timeout=20))

    async with anyio.create_task_group() as tg:
        async with hosting(Napper(config, ledger)) as host:
            for _ in range(3):
                tg.start_soon(ask)
            await wait_until(lambda: host.counters["doze"].in_flight == 3)
        # the host has stopped, after answering
        assert ledger.done["doze"] == 3
    assert replies == [Woke(attempt=0)] * 3
