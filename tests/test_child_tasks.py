"""``submit_child_and_wait``: a parent task submits a child task and waits, its failure rule declared at the call.

- ``on_failure="fail"``: a child that failed fails the parent at once, with the child's code and message;
- ``on_failure="retry"``: the parent is delivered again (its own retry policy bounds it), then dead-lettered with
  the child's error as its last one;
- ``on_dead`` overrides the rule for a child that ran out of attempts (the cycle's rule: failed fails, dead retries);
- a child still running at the parent's wait timeout counts as failed, code ``timeout``;
- the child's result comes back as its model; parent and child are one trace.

Parent and child run in agents of their own, on a real nats-server.
"""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

from dspyrt.bus import Message, PermanentError, RetryableError, TaskStatus
from dspyrt.runtime.agent import Agent, RetryPolicy, TaskContext, task
from dspyrt.runtime.children import ChildFailureRule, submit_child_and_wait
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import hosting

pytestmark = pytest.mark.timeout(60)


class ChildJob(Message):
    n: int


class ChildResult(Message):
    square: int


class ParentJob(Message):
    child: str  # the child's task kind: what the child will do
    on_failure: ChildFailureRule
    on_dead: ChildFailureRule | None = None
    wait: float | None = None


class Children(Agent):
    name = "children"

    def __init__(self, config: IntegrationConfig) -> None:
        super().__init__(config)
        self.runs: Counter[str] = Counter()
        self.release = anyio.Event()

    @task("square")
    async def square(self, job: ChildJob, ctx: TaskContext) -> ChildResult:
        self.runs[ctx.task_id] += 1
        return ChildResult(square=job.n * job.n)

    @task("refuse")
    async def refuse(self, job: ChildJob, ctx: TaskContext) -> ChildResult:
        self.runs[ctx.task_id] += 1
        raise PermanentError(f"{job.n} is not a number I square", code="not_squarable")

    @task("die", retry=RetryPolicy(max_attempts=1))
    async def die(self, job: ChildJob, ctx: TaskContext) -> ChildResult:
        self.runs[ctx.task_id] += 1
        raise RetryableError("the squaring service is down")

    @task("linger")
    async def linger(self, job: ChildJob, ctx: TaskContext) -> ChildResult:
        """Runs until the test lets it go (after the parent gave up on it)."""
        self.runs[ctx.task_id] += 1
        await self.release.wait()
        return ChildResult(square=job.n * job.n)


class Parents(Agent):
    name = "parents"

    def __init__(self, config: IntegrationConfig) -> None:
        super().__init__(config)
        self.runs: Counter[str] = Counter()

    @task("parent", retry=RetryPolicy(max_attempts=2, initial_delay=0.05, max_delay=0.05))
    async def parent(self, job: ParentJob, ctx: TaskContext) -> ChildResult:
        self.runs[ctx.task_id] += 1
        return await submit_child_and_wait(
            self.client,
            job.child,
            ChildJob(n=7),
            ChildResult,
            task_id=f"{ctx.task_id}-child",
            on_failure=job.on_failure,
            on_dead=job.on_dead,
            timeout=job.wait,
        )


async def test_a_child_that_succeeds_gives_its_result_in_the_parents_trace(
    config: IntegrationConfig, client: Client
) -> None:
    children, parents = Children(config), Parents(config)
    async with hosting(children), hosting(parents):
        record = await client.run("parent", ParentJob(child="square", on_failure="fail"), timeout=20)
        child = await client.task(f"{record.id}-child")
    assert record.status is TaskStatus.SUCCEEDED
    assert record.result == {"square": 49}
    assert child.status is TaskStatus.SUCCEEDED
    assert child.submitted_by == "parents"
    assert record.trace_id is not None and child.trace_id == record.trace_id


@pytest.mark.parametrize(
    ("child", "on_failure", "on_dead", "status", "parent_runs", "code"),
    [
        # evaluate's rule: whatever way a shard did not succeed, the evaluation fails
        pytest.param("refuse", "fail", None, TaskStatus.FAILED, 1, "not_squarable", id="failed-child-fails"),
        pytest.param("die", "fail", None, TaskStatus.FAILED, 1, "exhausted", id="dead-child-fails"),
        # a retry rule: the parent is delivered again until its own attempts are spent
        pytest.param("refuse", "retry", None, TaskStatus.DEAD, 2, "exhausted", id="failed-child-retries"),
        # the cycle's rule: a failed phase fails the cycle, a dead one has it delivered again
        pytest.param("refuse", "fail", "retry", TaskStatus.FAILED, 1, "not_squarable", id="cycle-rule-failed"),
        pytest.param("die", "fail", "retry", TaskStatus.DEAD, 2, "exhausted", id="cycle-rule-dead"),
    ],
)
async def test_the_declared_rule_decides_what_a_child_that_did_not_succeed_means(
    config: IntegrationConfig,
    client: Client,
    child: str,
    on_failure: ChildFailureRule,
    on_dead: ChildFailureRule | None,
    status: TaskStatus,
    parent_runs: int,
    code: str,
) -> None:
    children, parents = Children(config), Parents(config)
    async with hosting(children), hosting(parents):
        job = ParentJob(child=child, on_failure=on_failure, on_dead=on_dead)
        record = await client.run("parent", job, timeout=20)
    child_id = f"{record.id}-child"
    assert record.status is status, record
    assert parents.runs[record.id] == parent_runs
    assert children.runs[child_id] == 1  # a parent's redelivery finds its child ended: it does not run again
    assert record.error is not None
    assert record.error.code == code
    child_error = "7 is not a number I square" if child == "refuse" else "the squaring service is down"
    assert f"{child} task {child_id} ended" in record.error.message
    assert child_error in record.error.message
    if status is TaskStatus.DEAD:  # its last error: the child's, carried by the retryable error
        assert "deliveries; last error" in record.error.message


async def test_a_child_still_running_at_the_parents_wait_timeout_fails_the_parent(
    config: IntegrationConfig, client: Client
) -> None:
    children, parents = Children(config), Parents(config)
    async with hosting(children), hosting(parents):
        job = ParentJob(child="linger", on_failure="fail", wait=1.0)
        record = await client.run("parent", job, timeout=10)  # the parent's wait of 1 s ends it, not this one
        child = await client.task(f"{record.id}-child")
        children.release.set()
    assert record.status is TaskStatus.FAILED
    assert record.error is not None
    assert record.error.code == "timeout"
    assert record.error.message == f"linger task {record.id}-child did not finish within the parent's wait of 1s"
    assert parents.runs[record.id] == 1
    assert child.status is TaskStatus.RUNNING  # the parent gave up on it; it was not ended for the parent


class Cube(Message):
    cube: int


class Misreading(Agent):
    """Reads a ``square`` child's result as the wrong model."""

    name = "misreading"

    @task("misread")
    async def misread(self, job: ChildJob, ctx: TaskContext) -> Cube:
        return await submit_child_and_wait(
            self.client, "square", job, Cube, task_id=f"{ctx.task_id}-child", on_failure="retry"
        )


async def test_a_child_result_that_is_not_its_model_fails_the_parent(config: IntegrationConfig, client: Client) -> None:
    async with hosting(Children(config)), hosting(Misreading(config)):
        record = await client.run("misread", ChildJob(n=2), timeout=20)
    assert record.status is TaskStatus.FAILED  # at once: the stored result will not change
    assert record.error is not None and record.error.code == "invalid_message"
    assert "square task" in record.error.message and "no Cube" in record.error.message
    assert [e.loc for e in record.error.field_errors] == ["cube", "square"]  # missing; not a Cube's


async def test_an_unknown_rule_is_refused_before_anything_is_submitted(client: Client) -> None:
    with pytest.raises(ValueError, match="'fail' or 'retry', not 'ignore'"):
        await submit_child_and_wait(
            client,
            "square",
            ChildJob(n=1),
            ChildResult,
            task_id="orphan",
            on_failure="ignore",  # type: ignore[arg-type]
        )
    assert await client.tasks() == []
