"""Durable tasks: retries, dead letters, exactly-one result per task id, malformed task messages."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import anyio
import pytest
from nats.js import api

from dspyrt.bus import (
    Bus,
    DspyrtError,
    ErrorBody,
    Message,
    MessageValidationError,
    PermanentError,
    RemoteError,
    RetryableError,
    TaskRecord,
    TaskStatus,
    TaskStore,
)
from dspyrt.bus.errors import is_permanent
from dspyrt.bus.events import publish_event
from dspyrt.bus.messages import MSG_ID_HEADER, TASK_ID_HEADER
from dspyrt.bus.streams import kv_keys_matching
from dspyrt.bus.tasks import ExhaustedTaskWatcher, TaskEnvelope, replay_message_id
from dspyrt.runtime.agent import Agent, RetryPolicy, TaskContext, task
from dspyrt.runtime.client import Client
from dspyrt.runtime.config import IntegrationConfig
from tests.helpers import dead_letters_of, hosting, wait_until

pytestmark = pytest.mark.timeout(60)


class Job(Message):
    n: int


class Done(Message):
    n: int
    attempt: int


class Worker(Agent):
    """Task handlers whose behaviour each test picks; ``calls`` counts deliveries per (kind, task id)."""

    name = "worker"

    def __init__(self, config: IntegrationConfig) -> None:
        super().__init__(config)
        self.calls: Counter[tuple[str, str]] = Counter()

    @task("double")
    async def double(self, job: Job, ctx: TaskContext) -> Done:
        self.calls["double", ctx.task_id] += 1
        return Done(n=job.n * 2, attempt=ctx.attempt)

    @task("flaky")
    async def flaky(self, job: Job, ctx: TaskContext) -> Done:
        """Fails its first delivery with an unexpected error (retried with the default backoff)."""
        self.calls["flaky", ctx.task_id] += 1
        if ctx.attempt == 1:
            raise RuntimeError("transient glitch")
        return Done(n=job.n, attempt=ctx.attempt)

    @task("doomed", retry=RetryPolicy(max_attempts=3))
    async def doomed(self, job: Job, ctx: TaskContext) -> Done:
        self.calls["doomed", ctx.task_id] += 1
        raise RetryableError("upstream still down", delay=0.05)

    @task("refused")
    async def refused(self, job: Job, ctx: TaskContext) -> Done:
        self.calls["refused", ctx.task_id] += 1
        raise PermanentError(f"{job.n} is not allowed")

    @task("remote-refusal")
    async def remote_refusal(self, job: Job, ctx: TaskContext) -> Done:
        """Fails the way a handler does when another agent refuses its request (an error reply)."""
        self.calls["remote-refusal", ctx.task_id] += 1
        raise RemoteError(ErrorBody(code="not_found", message=f"no program {job.n}"))

    @task("opaque")
    async def opaque(self, job: Job, ctx: TaskContext) -> dict[str, Any]:
        self.calls["opaque", ctx.task_id] += 1
        return {"n": job.n, "handle": object()}  # a result the task record cannot hold


async def test_task_succeeds(config: IntegrationConfig, client: Client) -> None:
    async with hosting(Worker(config)) as host:
        record = await client.run("double", Job(n=21), timeout=20)
        assert record.status is TaskStatus.SUCCEEDED
        assert record.result == {"n": 42, "attempt": 1}
        assert record.attempts == 1
        assert record.submitted_by == "test"
        assert record.worker == f"worker/{host.instance_id}"


async def test_failure_on_first_delivery_is_retried(config: IntegrationConfig, client: Client) -> None:
    worker = Worker(config)
    async with hosting(worker):
        record = await client.run("flaky", Job(n=7), timeout=20)
    assert record.status is TaskStatus.SUCCEEDED
    assert record.attempts == 2
    assert record.result == {"n": 7, "attempt": 2}
    assert record.error is None
    assert worker.calls["flaky", record.id] == 2
    assert [letter for _, letter in await client.dead_letters() if letter.task_id == record.id] == []


async def test_dead_letter_after_max_deliveries(config: IntegrationConfig, client: Client) -> None:
    worker = Worker(config)
    async with hosting(worker):
        record = await client.run("doomed", Job(n=1), timeout=20)
    assert record.status is TaskStatus.DEAD
    assert record.attempts == 3
    assert record.error is not None
    assert record.error.code == "exhausted"
    assert "upstream still down" in record.error.message
    assert worker.calls["doomed", record.id] == 3

    [letter] = await dead_letters_of(client, record.id)
    assert letter.kind == "doomed"
    assert letter.deliveries == 3
    assert letter.reason.code == "exhausted"
    assert "3 deliveries" in letter.reason.message
    assert TaskEnvelope.model_validate_json(letter.envelope).input == {"n": 1}


async def test_permanent_error_goes_straight_to_dead_letters(config: IntegrationConfig, client: Client) -> None:
    worker = Worker(config)
    async with hosting(worker):
        record = await client.run("refused", Job(n=13), timeout=20)
    assert record.status is TaskStatus.FAILED
    assert record.attempts == 1
    assert record.error is not None
    assert (record.error.code, record.error.message) == ("permanent", "13 is not allowed")
    assert worker.calls["refused", record.id] == 1

    [letter] = await dead_letters_of(client, record.id)
    assert (letter.reason.code, letter.deliveries) == ("permanent", 1)


async def test_invalid_task_input_fails_with_field_errors(config: IntegrationConfig, client: Client) -> None:
    worker = Worker(config)
    async with hosting(worker):
        record = await client.run("double", {"n": "many"}, timeout=20)
        assert record.status is TaskStatus.FAILED
        assert record.error is not None
        assert record.error.code == "invalid_message"
        assert [fe.loc for fe in record.error.field_errors] == ["n"]
        assert worker.calls["double", record.id] == 0
        [letter] = await dead_letters_of(client, record.id)
        assert letter.reason.code == "invalid_message"
        # still working
        assert (await client.run("double", Job(n=2), timeout=20)).result == {"n": 4, "attempt": 1}


async def test_malformed_task_message_is_dead_lettered(config: IntegrationConfig, bus: Bus, client: Client) -> None:
    """Bytes that are not a task envelope (not JSON, not UTF-8) are dead-lettered; the worker carries on."""
    async with hosting(Worker(config)) as host:
        await bus.js.publish(config.subjects.task("double"), b"\xff\xfe not an envelope")
        await wait_until(lambda: host.workers[0].stats.failed == 1)
        [(_, letter)] = await client.dead_letters()
        assert letter.task_id.startswith("invalid-")
        assert letter.reason.code == "invalid_message"
        assert letter.deliveries == 1
        assert (await client.run("double", Job(n=5), timeout=20)).result == {"n": 10, "attempt": 1}


async def test_a_dead_letter_keeps_a_task_whose_text_holds_a_replacement_character(
    config: IntegrationConfig, client: Client
) -> None:
    """U+FFFD is ordinary text in a valid task; the letter used to drop it, taking it for a decoding error."""
    async with hosting(Worker(config)):
        record = await client.run("refused", {"n": 3, "note": "caf\ufffd"}, timeout=20)  # unknown field: refused
        [letter] = await dead_letters_of(client, record.id)
        assert letter.reason.code == "invalid_message"
        assert TaskEnvelope.model_validate_json(letter.envelope).input == {"n": 3, "note": "caf\ufffd"}


async def test_same_task_id_runs_once(config: IntegrationConfig, bus: Bus, client: Client) -> None:
    worker = Worker(config)
    async with hosting(worker) as host:
        first = await client.submit("double", Job(n=1), task_id="order-17")
        again = await client.submit("double", Job(n=999), task_id="order-17")
        assert (first.task_id, first.created) == ("order-17", True)
        assert (again.task_id, again.created) == ("order-17", False)
        record = await client.result("order-17", timeout=20)
        assert record.result == {"n": 2, "attempt": 1}

        # concurrent submissions of one new id: exactly one is created
        async with anyio.create_task_group() as tg:
            subs = []

            async def submit() -> None:
                subs.append(await client.submit("double", Job(n=3), task_id="order-18"))

            for _ in range(5):
                tg.start_soon(submit)
        assert sorted(s.created for s in subs) == [False, False, False, False, True]
        assert (await client.result("order-18", timeout=20)).result == {"n": 6, "attempt": 1}

        # submitted again after it finished: still nothing runs, the stored result stands
        assert not (await client.submit("double", Job(n=5), task_id="order-17")).created

        # the stream itself drops a re-publish with the same Nats-Msg-Id
        envelope = TaskEnvelope(id="order-17", kind="double", input={"n": 1})
        ack = await bus.js.publish(
            config.subjects.task("double"),
            envelope.model_dump_json().encode(),
            headers={MSG_ID_HEADER: "order-17", TASK_ID_HEADER: "order-17"},
        )
        assert ack.duplicate

        # a copy under another message id of its own (a replay's) reaches a worker, which sees the stored result
        # and does not rerun it
        await bus.js.publish(
            config.subjects.task("double"),
            envelope.model_dump_json().encode(),
            headers={MSG_ID_HEADER: replay_message_id("order-17"), TASK_ID_HEADER: "order-17"},
        )
        await wait_until(lambda: host.workers[0].stats.duplicates == 1)
        assert worker.calls["double", "order-17"] == 1
        assert worker.calls["double", "order-18"] == 1
        assert (await client.task("order-17")).result == {"n": 2, "attempt": 1}


async def test_an_error_whose_code_cannot_heal_fails_the_task_at_once(
    config: IntegrationConfig, client: Client
) -> None:
    """The worker decides by the error's code, wherever it came from: each agent used to re-wrap such errors in a
    PermanentError with its own list of codes (five lists, all different)."""
    worker = Worker(config)
    async with hosting(worker):
        record = await client.run("remote-refusal", Job(n=7), timeout=20)
    assert record.status is TaskStatus.FAILED
    assert record.error == ErrorBody(code="not_found", message="no program 7")
    assert worker.calls["remote-refusal", record.id] == 1


def test_which_errors_are_permanent() -> None:
    assert is_permanent(PermanentError("no"))
    assert is_permanent(MessageValidationError("bad"))
    assert is_permanent(DspyrtError("gone", code="not_found"))
    assert is_permanent(RemoteError(ErrorBody(code="provider_error", message="401")))
    assert not is_permanent(DspyrtError("slow", code="timeout"))
    assert not is_permanent(RemoteError(ErrorBody(code="unavailable", message="no responders")))
    assert not is_permanent(RetryableError("later", code="not_found"))  # the handler's own word wins
    assert not is_permanent(RuntimeError("glitch"))


async def test_a_result_that_cannot_be_stored_fails_the_task_at_once(config: IntegrationConfig, client: Client) -> None:
    """It passed a lenient JSON check, then the record's serializer refused it outside the error handling: the
    delivery was neither acked nor naked, and the handler ran max_deliver times before the task died 'exhausted'."""
    worker = Worker(config)
    async with hosting(worker):
        record = await client.run("opaque", Job(n=1), timeout=20)
        assert record.status is TaskStatus.FAILED
        assert record.error is not None and record.error.code == "invalid_result"
        [letter] = await dead_letters_of(client, record.id)
        assert letter.reason.code == "invalid_result"
        assert worker.calls["opaque", record.id] == 1


async def test_exhausted_deliveries_are_dead_lettered_by_the_watcher(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    """A consumer that takes the task and never answers (a hung or crashed worker): after max_deliver
    timed-out deliveries JetStream gives up, and the advisory watcher dead-letters the task."""
    s = config.subjects
    kind = "stuck"
    watcher = await ExhaustedTaskWatcher(bus, client.store, kind, max_deliver=2).start()
    consumer = api.ConsumerConfig(
        durable_name=s.task_consumer(kind),
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=0.3,
        max_deliver=2,
        filter_subject=s.task(kind),
    )
    psub = await bus.js.pull_subscribe(
        s.task(kind), durable=s.task_consumer(kind), stream=s.task_stream, config=consumer
    )
    submission = await client.submit(kind, Job(n=1))

    deliveries = 0

    async def take_and_drop() -> bool:
        nonlocal deliveries
        try:
            deliveries += len(await psub.fetch(1, timeout=0.2))  # never acked
        except TimeoutError:
            pass
        record = await client.task(submission.task_id)
        return record.status.terminal

    try:
        await wait_until(take_and_drop, timeout=20)
        assert deliveries == 2

        record = await client.task(submission.task_id)
        assert record.status is TaskStatus.DEAD
        assert record.error is not None
        assert record.error.code == "exhausted"
        [letter] = await dead_letters_of(client, submission.task_id)
        assert letter.deliveries == 2
        assert letter.reason.code == "exhausted"
        # moved, not copied: the work queue no longer holds it
        await wait_until(lambda: _stream_empty(bus, s.task_stream))
    finally:
        await psub.unsubscribe()
        await watcher.drain()


async def test_an_advisory_short_of_max_deliver_does_not_dead_letter_a_live_task(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    """The watcher trusts an advisory only when its delivery count reached max_deliver: one published by
    anything but JetStream (a forged advisory naming a live task's sequence) is ignored."""
    s = config.subjects
    kind = "watched"
    watcher = await ExhaustedTaskWatcher(bus, client.store, kind, max_deliver=5).start()
    try:
        submission = await client.submit(kind, Job(n=1), require_worker=False)  # only the watcher runs
        info = await bus.js.stream_info(s.task_stream)
        subject = s.max_deliveries_advisory(kind)
        forged = {"stream_seq": info.state.last_seq, "deliveries": 2}
        await bus.nc.publish(subject, json.dumps(forged).encode())
        await bus.flush()
        # the same advisory with the full count is acted on: so the one above was seen, and refused
        await bus.nc.publish(subject, json.dumps({**forged, "deliveries": 5}).encode())
        await wait_until(lambda: _is_dead(client, submission.task_id), timeout=10, what="task dead-lettered")
        [letter] = await dead_letters_of(client, submission.task_id)
        assert letter.deliveries == 5
    finally:
        await watcher.drain()


async def _is_dead(client: Client, task_id: str) -> bool:
    return (await client.task(task_id)).status is TaskStatus.DEAD


async def _stream_empty(bus: Bus, stream: str) -> bool:
    return (await bus.js.stream_info(stream)).state.messages == 0


async def test_records_are_keyed_by_kind_and_found_by_bare_id(
    config: IntegrationConfig, bus: Bus, client: Client
) -> None:
    """Keys are ``<kind>.<task id>`` (so permissions tell kinds apart), progress is ``task.progress.<kind>.<id>``;
    a lookup, a wait or a progress stream by bare id finds the task whatever its kind; an id names one task."""
    worker = Worker(config)
    async with hosting(worker):
        submitted = await client.submit("double", Job(n=4), task_id="keyed-1")
        record = await client.result("keyed-1", timeout=20)  # by bare id: watches $KV.<bucket>.*.keyed-1
        assert record.kind == "double" and record.result == {"n": 8, "attempt": 1}
        assert submitted.created
        assert await kv_keys_matching(bus.js, config.subjects.task_bucket, "*.keyed-1") == ["double.keyed-1"]
        assert (await client.task("keyed-1")).id == (await client.task("keyed-1", kind="double")).id == "keyed-1"
        assert await client.store.get("keyed-1", kind="flaky") is None
        assert client.store.key_subject("keyed-1") == f"$KV.{config.subjects.task_bucket}.*.keyed-1"

        # the same id under another kind is the existing task, not a second one (nor a second message id)
        other = await client.submit("flaky", Job(n=1), task_id="keyed-1")
        assert not other.created
        assert await client.store.get("keyed-1", kind="flaky") is None
        assert worker.calls["flaky", "keyed-1"] == 0

        # an agent writing a record of its own kind under someone else's task id cannot shadow that task: a bare-id
        # lookup takes the first record written (a fresh store, so nothing is remembered from above)
        forged = TaskRecord(id="keyed-1", kind="flaky", status=TaskStatus.SUCCEEDED, result={"n": 666})
        await client.store.kv.put("flaky.keyed-1", forged.model_dump_json().encode())
        fresh = await TaskStore.open(bus)
        found = await fresh.get("keyed-1")
        assert found is not None and (found.kind, found.result) == ("double", {"n": 8, "attempt": 1})
        await client.store.kv.delete("flaky.keyed-1")

        # a record written under a bare task id (before kinds were in the key) is not migrated: not found, not listed
        await client.store.kv.put("legacy-1", TaskRecord(id="legacy-1", kind="double", status=TaskStatus.PENDING)
                                  .model_dump_json().encode())  # fmt: skip
        assert await client.store.get("legacy-1") is None
        assert [r.id for r in await client.tasks()] == ["keyed-1"]

        # progress carries the kind in its subject; a reader by bare id gets it
        topic = config.subjects.task_progress_topic("double", "keyed-1")
        assert topic == "task.progress.double.keyed-1"
        await publish_event(bus, topic, {"task_id": "keyed-1", "phase": "done"}, source="test")
        with anyio.fail_after(10):
            async for event in client.progress("keyed-1"):
                assert (event.topic, event.data["phase"]) == (topic, "done")
                break
