"""The worker runs a task message only as the task it is: its envelope's ``id`` is its ``Nats-Msg-Id`` and its
``kind`` is its subject's (``<prefix>.task.<kind>``).

Anything else is dead-lettered as ``invalid-<stream sequence>`` with a reason naming both values, terminated (not
left in the queue), never run, and the id it claims is not touched; the agent keeps serving. The messages are
published on a raw nats-py connection, as anyone with publish rights on a task subject could.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient

from dspyrt.bus import Message, TaskRecord, TaskStatus
from dspyrt.bus.messages import MSG_ID_HEADER, TASK_ID_HEADER
from dspyrt.bus.tasks import TaskEnvelope, message_id_names, replay_message_id
from dspyrt.runtime.agent import Agent, TaskContext, task
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import dead_letters_of, hosting, wait_until

pytestmark = pytest.mark.timeout(60)


class Job(Message):
    n: int


class Done(Message):
    n: int


class Echo(Agent):
    name = "echo"

    def __init__(self, config: IntegrationConfig) -> None:
        super().__init__(config)
        self.runs: Counter[str] = Counter()

    @task("echo")
    async def echo(self, job: Job, ctx: TaskContext) -> Done:
        self.runs[ctx.task_id] += 1
        return Done(n=job.n)

    @task("other")
    async def other(self, job: Job, ctx: TaskContext) -> Done:
        self.runs[ctx.task_id] += 1
        return Done(n=-job.n)


@pytest.fixture
async def raw(config: IntegrationConfig, client: Client) -> AsyncIterator[NatsClient]:
    """A plain nats-py connection (after ``client``: the streams exist)."""
    nc = await nats.connect(config.nats_urls[0])
    try:
        yield nc
    finally:
        await nc.close()


async def publish(
    raw: NatsClient, config: IntegrationConfig, kind: str, envelope: TaskEnvelope, headers: dict[str, str]
) -> int:
    """The envelope on ``<prefix>.task.<kind>`` with exactly ``headers``; its stream sequence."""
    data = envelope.model_dump_json().encode()
    ack = await raw.jetstream().publish(config.subjects.task(kind), data, headers=headers)
    return int(ack.seq)


async def queue_empty(client: Client) -> bool:
    return int((await client.bus.js.stream_info(client.bus.subjects.task_stream)).state.messages) == 0


async def finished(client: Client, task_id: str) -> TaskRecord:
    """The record of a task published raw (no submit wrote it: the worker does), once it has ended."""

    async def recorded() -> bool:
        return await client.store.get(task_id) is not None

    await wait_until(recorded, timeout=10, what=f"a record of {task_id}")
    return await client.result(task_id, timeout=20)


async def refused(client: Client, seq: int) -> tuple[str, str]:
    """The dead letter of stream message ``seq``: its reason's code and message, once it is out of the queue."""
    [letter] = await dead_letters_of(client, f"invalid-{seq}")
    assert letter.deliveries == 1
    assert (await client.task(f"invalid-{seq}")).status is TaskStatus.FAILED
    await wait_until(lambda: queue_empty(client), timeout=5, what=f"message {seq} terminated")
    return letter.reason.code, letter.reason.message


async def test_an_envelope_whose_id_is_not_its_message_id_is_dead_lettered_and_never_run(
    config: IntegrationConfig, client: Client, raw: NatsClient
) -> None:
    agent = Echo(config)
    async with hosting(agent):
        envelope = TaskEnvelope(id="task-a", kind="echo", input={"n": 1})
        seq = await publish(raw, config, "echo", envelope, {MSG_ID_HEADER: "task-b", TASK_ID_HEADER: "task-a"})
        code, message = await refused(client, seq)
        assert code == "id_mismatch"
        assert message == (
            f"task 'task-a' came on {config.subjects.task('echo')} with Nats-Msg-Id 'task-b'; not run: a task "
            "message's Nats-Msg-Id is its task id (submit it with Client.submit or 'dspyrt submit')."
        )
        assert agent.runs == Counter()
        # neither id it names is touched
        assert await client.store.get("task-a") is None
        assert await client.store.get("task-b") is None

        # the agent keeps serving: the same envelope under its own message id runs
        seq = await publish(raw, config, "echo", envelope, {MSG_ID_HEADER: "task-a"})
        record = await finished(client, "task-a")
        assert (record.status, record.result, record.message_seq) == (TaskStatus.SUCCEEDED, {"n": 1}, seq)
        assert agent.runs == Counter({"task-a": 1})


async def test_an_envelope_without_a_message_id_is_dead_lettered(
    config: IntegrationConfig, client: Client, raw: NatsClient
) -> None:
    """Without ``Nats-Msg-Id`` the stream cannot drop a second copy: such a message never runs."""
    agent = Echo(config)
    async with hosting(agent):
        seq = await publish(raw, config, "echo", TaskEnvelope(id="bare", kind="echo", input={"n": 2}), {})
        code, message = await refused(client, seq)
        assert code == "id_mismatch"
        assert "task 'bare' came on" in message and "with no Nats-Msg-Id header; not run" in message
        assert agent.runs == Counter()
        assert await client.store.get("bare") is None


async def test_an_envelope_whose_kind_is_not_its_subjects_is_dead_lettered_and_never_run(
    config: IntegrationConfig, client: Client, raw: NatsClient
) -> None:
    agent = Echo(config)
    async with hosting(agent):
        envelope = TaskEnvelope(id="crossed", kind="other", input={"n": 3})
        seq = await publish(raw, config, "echo", envelope, {MSG_ID_HEADER: "crossed"})
        code, message = await refused(client, seq)
        assert code == "kind_mismatch"
        assert f"task 'crossed' says kind 'other' but came on {config.subjects.task('echo')} (kind 'echo')" in message
        assert agent.runs == Counter()  # run as neither kind
        assert await client.store.get("crossed") is None
        assert (await client.run("echo", Job(n=4), timeout=20)).result == {"n": 4}


async def test_a_replays_message_id_names_its_task_and_no_other(
    config: IntegrationConfig, client: Client, raw: NatsClient
) -> None:
    """A replay publishes under ``<id>-replay-<ms>`` (its original id may still be in the duplicate window): that
    runs; the same form naming another task does not."""
    agent = Echo(config)
    async with hosting(agent):
        envelope = TaskEnvelope(id="again", kind="echo", input={"n": 5})
        forged = replay_message_id("someone-else")
        seq = await publish(raw, config, "echo", envelope, {MSG_ID_HEADER: forged})
        code, message = await refused(client, seq)
        assert code == "id_mismatch" and repr(forged) in message
        await publish(raw, config, "echo", envelope, {MSG_ID_HEADER: replay_message_id("again")})
        record = await finished(client, "again")
        assert (record.status, record.result) == (TaskStatus.SUCCEEDED, {"n": 5})
        assert agent.runs == Counter({"again": 1})


@pytest.mark.parametrize(
    ("msg_id", "names"),
    [
        ("t1", True),
        ("t1-replay-1700000000000", True),
        (None, False),
        ("", False),
        ("t2", False),
        ("t1-copy", False),
        ("t1-replay-", False),
        ("t1-replay-12a", False),
        ("t1-replay-١٢", False),  # digits, but not ASCII ones
        ("t0-t1-replay-1", False),
        ("t1-replay-1-replay-2", False),
    ],
)
def test_which_message_ids_name_a_task(msg_id: str | None, names: bool) -> None:
    assert message_id_names(msg_id, "t1") is names
