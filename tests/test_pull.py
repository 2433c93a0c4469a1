"""How task workers pull: many short tasks per request, a lone task at once, and nothing but stored messages."""

from __future__ import annotations

import json

import anyio
import pytest

from dspyrt.bus import Bus, Message, TaskStatus
from dspyrt.runtime.agent import Agent, TaskContext, task
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import hosting, wait_until

pytestmark = pytest.mark.timeout(60)

QUEUED = 120


class Job(Message):
    n: int


class Done(Message):
    n: int


class Quick(Agent):
    name = "quick"

    @task("quick", concurrency=16)
    async def quick(self, job: Job, ctx: TaskContext) -> Done:
        return Done(n=job.n + 1)


class PullRequests:
    """Counts the pull requests sent for a kind (a subscriber on JetStream's API subject sees each one)."""

    def __init__(self) -> None:
        self.count = 0
        self.inboxes: list[str] = []

    async def watch(self, bus: Bus, kind: str) -> object:
        async def seen(msg: object) -> None:
            self.count += 1
            self.inboxes.append(msg.reply)  # type: ignore[attr-defined]

        return await bus.nc.subscribe(bus.subjects.task_pull(kind), cb=seen)


async def test_a_backlog_of_short_tasks_is_pulled_many_per_request(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    async with hosting(Quick(config)):
        pass  # the consumer exists: the kind is served
    ids = [(await client.submit("quick", Job(n=i))).task_id for i in range(QUEUED)]
    requests = PullRequests()
    sub = await requests.watch(bus, "quick")
    async with hosting(Quick(config)) as host:
        worker = host.workers[0]
        await wait_until(lambda: worker.stats.succeeded == QUEUED, timeout=40, what="the backlog done")
    await sub.unsubscribe()  # type: ignore[attr-defined]
    records = [await client.task(task_id) for task_id in ids]
    assert [r.status for r in records] == [TaskStatus.SUCCEEDED] * QUEUED
    assert [r.result for r in records] == [{"n": i + 1} for i in range(QUEUED)]
    # One at a time until the first results say the tasks are short, then every free slot per request.
    assert requests.count <= QUEUED / 3, f"{requests.count} pull requests for {QUEUED} queued tasks"


async def test_a_lone_task_is_not_held_back_to_fill_a_batch(config: IntegrationConfig, client: Client) -> None:
    async with hosting(Quick(config)) as host:
        worker = host.workers[0]
        for i in range(5):  # the worker learns its tasks are short: it pulls every free slot from now on
            await client.result((await client.submit("quick", Job(n=i))).task_id, timeout=10)
        assert worker.batch_limit() == 16
        await anyio.sleep(0.3)  # the worker is waiting in a long poll
        with anyio.fail_after(0.9):  # well under the 1 s long poll a filling batch would wait out
            record = await client.result((await client.submit("quick", Job(n=41))).task_id, timeout=5)
    assert record.result == {"n": 42}


async def test_messages_forged_onto_a_pull_inbox_are_not_run(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    """A co-tenant that sees the pull request learns its reply inbox; what it publishes there is dropped."""
    requests = PullRequests()
    sub = await requests.watch(bus, "quick")
    async with hosting(Quick(config)) as host:
        worker = host.workers[0]
        await wait_until(lambda: requests.count > 0, what="a pull request")
        inbox = requests.inboxes[-1]
        await bus.nc.publish(inbox, b'{"id": "forged", "kind": "quick", "input": {"n": 1}}')
        await bus.nc.publish(inbox, b"\x00garbage", headers={"Status": "200"})
        await bus.nc.publish(inbox, b"not a task", reply="_INBOX.someone.else")
        await bus.nc.flush()
        record = await client.result((await client.submit("quick", Job(n=1))).task_id, timeout=10)
        assert record.result == {"n": 2}
        assert (worker.stats.received, worker.stats.failed, worker.stats.last_error) == (1, 0, "")
        assert host.bus.inbound.messages_dropped == 2  # the two with no ack subject; counted where health sees it
    await sub.unsubscribe()  # type: ignore[attr-defined]
    assert await client.store.get("forged") is None


async def test_a_consumer_that_caps_its_batches_still_gets_its_tasks_run(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    """An operator set max_request_batch below the worker's free slots: the server refuses those pulls (409), and
    the worker pulls one at a time instead of stalling."""
    async with hosting(Quick(config)):
        pass
    stream, durable = config.subjects.task_stream, config.subjects.task_consumer("quick")
    settings = (await bus.js.consumer_info(stream, durable)).config.as_dict()
    reply = await bus.nc.request(
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
        json.dumps({"stream_name": stream, "config": {**settings, "max_batch": 2}}).encode(),
    )
    assert json.loads(reply.data).get("config", {}).get("max_batch") == 2, reply.data
    ids = [(await client.submit("quick", Job(n=i))).task_id for i in range(40)]
    async with hosting(Quick(config)) as host:
        worker = host.workers[0]
        await wait_until(lambda: worker.stats.succeeded == 40, timeout=30, what="every task run")
    assert [(await client.task(task_id)).result for task_id in ids] == [{"n": i + 1} for i in range(40)]
