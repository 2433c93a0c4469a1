"""A task declares its policy where it is defined: ``@task(kind, retry=RetryPolicy(...), timeout=...)``.

- a retryable failure is delivered exactly ``max_attempts`` times, each wait at least the policy's and longer than
  the one before, then dead-lettered ``exhausted`` (and the kind's consumer has that ``max_deliver``);
- a handler past its ``timeout`` is cancelled and failed with code ``timeout``, never redelivered, even while it
  heartbeats;
- a permanent error is not retried, whatever the policy;
- a policy that cannot work is refused where it is declared.

Real nats-server; the attempts are counted and timed inside the handlers.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict

import anyio
import pytest
from pydantic import ValidationError

from dspyrt.bus import Bus, DspyrtError, Message, PermanentError, RetryableError, TaskStatus
from dspyrt.runtime.agent import Agent, RetryPolicy, TaskContext, task
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import dead_letters_of, hosting, wait_until

pytestmark = pytest.mark.timeout(60)

BACKOFF = RetryPolicy(max_attempts=4, initial_delay=0.2, multiplier=3.0, max_delay=5.0)  # waits 0.2, 0.6, 1.8 s


class Job(Message):
    n: int


class Done(Message):
    n: int


class Policies(Agent):
    """One kind per policy; ``starts`` keeps the monotonic start time of every delivery, per task id."""

    name = "policies"

    def __init__(self, config: IntegrationConfig) -> None:
        super().__init__(config)
        self.starts: defaultdict[str, list[float]] = defaultdict(list)
        self.cancelled: set[str] = set()

    def _started(self, ctx: TaskContext) -> None:
        self.starts[ctx.task_id].append(time.monotonic())

    @task("backoff", retry=BACKOFF)
    async def backoff(self, job: Job, ctx: TaskContext) -> Done:
        self._started(ctx)
        raise RetryableError(f"attempt {ctx.attempt}: upstream still down")

    @task("hang", timeout=1)
    async def hang(self, job: Job, ctx: TaskContext) -> Done:
        self._started(ctx)
        try:
            await anyio.sleep_forever()
        finally:
            self.cancelled.add(ctx.task_id)
        return Done(n=job.n)

    @task("busy-hang", timeout=1, ack_wait=0.5)
    async def busy_hang(self, job: Job, ctx: TaskContext) -> Done:
        """Hangs while telling JetStream it is alive, on a short ack_wait: heartbeats do not stretch the limit."""
        self._started(ctx)
        while True:
            await ctx.heartbeat()
            await anyio.sleep(0.05)

    @task("quick", timeout=5)
    async def quick(self, job: Job, ctx: TaskContext) -> Done:
        self._started(ctx)
        await anyio.sleep(0.05)
        return Done(n=job.n)

    @task("refused", retry=RetryPolicy(max_attempts=10, initial_delay=0.05, max_delay=0.05))
    async def refused(self, job: Job, ctx: TaskContext) -> Done:
        self._started(ctx)
        if job.n:
            raise DspyrtError(f"no program {job.n}", code="not_found")  # a code retrying cannot heal
        raise PermanentError("never allowed")

    @task("deployment-default", retry=RetryPolicy(initial_delay=0.05))
    async def deployment_default(self, job: Job, ctx: TaskContext) -> Done:
        self._started(ctx)
        raise RuntimeError("glitch")


async def queue_empty(bus: Bus) -> bool:
    """No task message is left in the work queue (each was acknowledged or terminated)."""
    return int((await bus.js.stream_info(bus.subjects.task_stream)).state.messages) == 0


async def test_a_retryable_failure_is_tried_max_attempts_times_with_growing_waits(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    agent = Policies(config)
    async with hosting(agent):
        consumer = await bus.js.consumer_info(bus.subjects.task_stream, bus.subjects.task_consumer("backoff"))
        assert consumer.config.max_deliver == 4
        record = await client.run("backoff", Job(n=1), timeout=30)
    starts = agent.starts[record.id]
    assert len(starts) == 4, starts
    assert record.status is TaskStatus.DEAD
    assert record.attempts == 4
    assert record.error is not None and record.error.code == "exhausted"
    assert "attempt 4: upstream still down" in record.error.message
    [letter] = await dead_letters_of(client, record.id)
    assert (letter.reason.code, letter.deliveries) == ("exhausted", 4)

    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    print("gaps between attempts:", [f"{gap:.3f}s" for gap in gaps])
    # The server redelivers no earlier than the nak's delay: each gap covers the policy's wait, and they grow.
    for gap, wait in zip(gaps, BACKOFF.delays(4), strict=False):
        assert gap >= wait, (gaps, BACKOFF.delays(4))
    assert gaps[0] < gaps[1] < gaps[2], gaps


@pytest.mark.parametrize("kind", ["hang", "busy-hang"])
async def test_a_handler_past_its_timeout_is_cancelled_and_failed_without_redelivery(
    config: IntegrationConfig, bus: Bus, client: Client, kind: str
) -> None:
    agent = Policies(config)
    async with hosting(agent) as host:
        started = time.monotonic()
        record = await client.run(kind, Job(n=1), timeout=10)
        took = time.monotonic() - started
        assert record.status is TaskStatus.FAILED, record
        assert record.error is not None
        assert record.error.code == "timeout"
        assert "timeout of 1s" in record.error.message
        assert record.attempts == 1
        # Terminated, not handed back: nothing left to deliver (a nak would keep it queued), nothing held.
        await wait_until(lambda: queue_empty(bus), timeout=5, what="the task message terminated")
        consumer = await bus.js.consumer_info(bus.subjects.task_stream, bus.subjects.task_consumer(kind))
        assert (consumer.num_ack_pending, consumer.num_redelivered, consumer.num_pending) == (0, 0, 0)
        [worker] = [w for w in host.workers if w.kind == kind]
        assert worker.stats.in_flight == 0
    print(f"{kind}: failed after {took:.2f}s")
    assert len(agent.starts[record.id]) == 1
    if kind == "hang":
        assert record.id in agent.cancelled
    [letter] = await dead_letters_of(client, record.id)
    assert (letter.reason.code, letter.deliveries) == ("timeout", 1)


async def test_a_handler_within_its_timeout_succeeds(config: IntegrationConfig, client: Client) -> None:
    async with hosting(Policies(config)):
        record = await client.run("quick", Job(n=3), timeout=20)
    assert record.status is TaskStatus.SUCCEEDED
    assert record.result == {"n": 3}


@pytest.mark.parametrize(("n", "code"), [(0, "permanent"), (7, "not_found")])
async def test_a_permanent_error_is_not_retried_whatever_the_policy(
    config: IntegrationConfig, bus: Bus, client: Client, n: int, code: str
) -> None:
    agent = Policies(config)
    async with hosting(agent):
        record = await client.run("refused", Job(n=n), timeout=20)
        # Terminated: no delivery can follow (a nak would have left it in the queue, pending redelivery).
        await wait_until(lambda: queue_empty(bus), timeout=5, what="the task message terminated")
        consumer = await bus.js.consumer_info(bus.subjects.task_stream, bus.subjects.task_consumer("refused"))
        assert (consumer.num_ack_pending, consumer.num_pending) == (0, 0)
    assert record.status is TaskStatus.FAILED
    assert record.error is not None and record.error.code == code
    assert record.attempts == 1
    assert len(agent.starts[record.id]) == 1
    [letter] = await dead_letters_of(client, record.id)
    assert (letter.reason.code, letter.deliveries) == (code, 1)


async def test_a_policy_without_max_attempts_takes_the_deployments(config: IntegrationConfig, client: Client) -> None:
    agent = Policies(config.model_copy(update={"task_max_deliver": 2}))
    async with hosting(agent):
        record = await client.run("deployment-default", Job(n=1), timeout=20)
    assert record.status is TaskStatus.DEAD
    assert len(agent.starts[record.id]) == 2


class Stricter(Agent):
    """The same kind as ``Policies.backoff`` in a later version of the code: fewer attempts."""

    name = "policies"

    @task("backoff", retry=RetryPolicy(max_attempts=2, initial_delay=0.05))
    async def backoff(self, job: Job, ctx: TaskContext) -> Done:
        raise RetryableError("still down")


async def test_the_consumer_follows_the_policy_the_code_declares_now(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    """The kind's durable consumer outlives its workers: one created for 4 attempts is updated to the new code's 2
    (else the server would keep redelivering past the worker's last attempt, or stop short of it)."""
    consumer_name = bus.subjects.task_consumer("backoff")
    async with hosting(Policies(config)):
        assert (await bus.js.consumer_info(bus.subjects.task_stream, consumer_name)).config.max_deliver == 4
    async with hosting(Stricter(config)):
        assert (await bus.js.consumer_info(bus.subjects.task_stream, consumer_name)).config.max_deliver == 2
        record = await client.run("backoff", Job(n=1), timeout=20)
    assert (record.status, record.attempts) == (TaskStatus.DEAD, 2)


# ----------------------------------------------------------------------------------------- declared up front


def test_the_default_policy_backs_off_and_caps() -> None:
    assert RetryPolicy().delays(6) == (1.0, 4.0, 16.0, 60.0, 60.0, 60.0)
    assert BACKOFF.delays(4) == pytest.approx((0.2, 0.6, 1.8, 5.0))
    # Growing without bound is capped as it goes: no overflow at the largest policy allowed.
    huge = RetryPolicy(max_attempts=1000, initial_delay=86_400, multiplier=100, max_delay=86_400)
    assert set(huge.delays(1000)) == {86_400.0}


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"max_attempts": 0}, "greater than or equal to 1"),
        ({"initial_delay": 10.0, "max_delay": 1.0}, "max_delay 1s is shorter than initial_delay 10s"),
        ({"multiplier": 0.5}, "greater than or equal to 1"),
        ({"retries": 3}, "Extra inputs are not permitted"),
    ],
)
def test_a_policy_that_cannot_work_is_refused_where_it_is_declared(settings: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        RetryPolicy.model_validate(settings)


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan")])
def test_a_timeout_that_is_no_limit_is_refused(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        task("nap", timeout=timeout)
