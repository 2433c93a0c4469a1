"""The client gateway: how clients that share one deployment submit and read tasks without reaching each other's.

Under the deploy's permissions a client user has no JetStream access at all: no stream or consumer API, no KV
bucket, no task subject. It may publish only on its own per-user subjects, ``<prefix>.gateway.<user>.<op>``, so
the server vouches for who asks (``current_requester()``); the gateway does the JetStream work with its own user
and answers each client about its own tasks only:

=========  ===========================================================================================
``submit``  a task of a kind clients may submit (``gateway_kinds``), recorded with the requester as owner;
            a task id already used by another user is refused without saying whose it is
``task``    one of the requester's task records (another user's id is "no task with id ...")
``wait``    long-polls (at most ``MAX_WAIT`` seconds) until the task ends; with its latest progress event
``list``    the requester's newest tasks
=========  ===========================================================================================

The embedded single-user default needs none of this (``Client`` talks to JetStream directly); a client configured
with ``client_gateway = true`` (the deploy's client users) goes through here (``GatewayTasks``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel, Field

from dspyrt.bus import Bus, Message, NotFoundError, TaskRecord, TaskStore, submit_task, wait_for_task
from dspyrt.bus.errors import DspyrtError
from dspyrt.bus.events import Event
from dspyrt.bus.messages import encode
from dspyrt.bus.subjects import check_token
from dspyrt.bus.tasks import Submission, TaskKinds, check_task_id
from dspyrt.runtime.agent import Agent, current_requester, endpoint
from dspyrt.runtime.config import IntegrationMode
from dspyrt.runtime.datasets import DatasetStore, has_references, pin_references

R = TypeVar("R", bound=BaseModel)

GATEWAY = "gateway"
MAX_WAIT = 20.0  # seconds one wait request may hold (a client loops)


class SubmitRequest(Message):
    kind: str = Field(min_length=1, max_length=64)
    input: dict[str, Any] = Field(default_factory=dict)
    task_id: str | None = None


class SubmitReply(Message):
    task_id: str
    created: bool
    requeued: bool = False


class TaskQuery(Message):
    task_id: str = Field(min_length=1, max_length=128)


class WaitRequest(TaskQuery):
    timeout: float = Field(default=MAX_WAIT, gt=0, le=MAX_WAIT)


class WaitReply(Message):
    record: TaskRecord
    progress: dict[str, Any] | None = None  # the data of the task's latest progress event


class ListRequest(Message):
    limit: int = Field(default=50, ge=1, le=1000)


class TaskList(Message):
    records: list[TaskRecord]


class GatewayAgent(Agent):
    """Submits and reads tasks on behalf of clients, each about its own tasks only."""

    name = GATEWAY
    group = "system"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.MONITORING_ONLY})
    description = "client gateway: submit, read and wait for one's own tasks (per-user subjects)"

    store: TaskStore
    kinds: TaskKinds

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.store = await TaskStore.open(self.bus)
        self.kinds = TaskKinds(self.bus)
        self._datasets: DatasetStore | None = None
        yield

    async def _owned(self, task_id: str) -> TaskRecord:
        user = _requester()
        record = await self.store.get(check_task_id(task_id))
        if record is None or record.submitted_by != user:
            # The same answer whether it does not exist or is someone else's: ids are not an oracle.
            raise NotFoundError(f"no task with id {task_id}")
        return record

    @endpoint("submit", per_user=True)
    async def submit(self, request: SubmitRequest) -> SubmitReply:
        """Submit a task as the requesting user."""
        user = _requester()
        kinds = self.config.gateway_kinds
        if request.kind not in kinds:
            raise NotFoundError(f"task kind {request.kind!r} is not offered to clients; offered: {', '.join(kinds)}")
        if request.task_id is not None:
            existing = await self.store.get(check_task_id(request.task_id))
            if existing is not None and existing.submitted_by != user:
                raise DspyrtError(f"task id {request.task_id} is taken: choose another", code="conflict")
        payload = request.input
        if has_references(payload):  # pinned here: the task runs on the versions that exist now
            payload = await pin_references(await self._dataset_store(), payload)
        submission: Submission = await submit_task(
            self.bus, self.store, request.kind, payload, task_id=request.task_id, submitted_by=user,
            kinds=self.kinds,
        )  # fmt: skip
        return SubmitReply(task_id=submission.task_id, created=submission.created, requeued=submission.requeued)

    async def _dataset_store(self) -> DatasetStore:
        if self._datasets is None:
            self._datasets = await DatasetStore.open(self.bus, self.config.stream_layout)
        return self._datasets

    @endpoint("task", per_user=True)
    async def task(self, request: TaskQuery) -> TaskRecord:
        """One of the requester's task records."""
        return await self._owned(request.task_id)

    @endpoint("wait", per_user=True)
    async def wait(self, request: WaitRequest) -> WaitReply:
        """The task's record once it has ended, or after ``timeout`` seconds; with its latest progress."""
        record = await self._owned(request.task_id)
        if not record.status.terminal:
            with anyio.move_on_after(request.timeout):
                record = await wait_for_task(self.bus, self.store, request.task_id, kind=record.kind)
            record = await self._owned(request.task_id)
        return WaitReply(record=record, progress=await self._progress(record.kind, request.task_id))

    @endpoint("list", per_user=True)
    async def list_tasks(self, request: ListRequest) -> TaskList:
        """The requester's newest tasks."""
        user = _requester()
        records = [r for r in await self.store.list(limit=10_000) if r.submitted_by == user]
        return TaskList(records=records[: request.limit])

    async def _progress(self, kind: str, task_id: str) -> dict[str, Any] | None:
        s = self.bus.subjects
        try:
            raw = await self.bus.js.get_last_msg(s.event_stream, s.event(s.task_progress_topic(kind, task_id)))
        except Exception:  # none yet (not found), or the stream is busy: progress is best effort
            return None
        try:
            return Event.model_validate(json.loads(raw.data or b"{}")).data
        except ValueError:
            return None


def _requester() -> str:
    user = current_requester()
    if not user:
        raise DspyrtError("a gateway request must come on a per-user subject", code="invalid_message")
    return user


class GatewayTasks:
    """A client's task operations through the gateway, as its own NATS user (``client_gateway = true``)."""

    def __init__(self, bus: Bus, user: str, *, headers: dict[str, str] | None = None) -> None:
        self.bus = bus
        self.user = check_token(user, "NATS user")
        self.headers = headers

    async def _ask(self, op: str, payload: Message, reply: type[R], timeout: float = 10.0) -> R:
        subject = self.bus.subjects.user_endpoint(GATEWAY, op, self.user)
        return await self.bus.request(subject, encode(payload), reply, timeout=timeout, headers=self.headers)

    async def submit(self, kind: str, input: dict[str, Any], *, task_id: str | None = None) -> Submission:
        answer = await self._ask("submit", SubmitRequest(kind=kind, input=input, task_id=task_id), SubmitReply)
        return Submission(answer.task_id, created=answer.created, requeued=answer.requeued)

    async def task(self, task_id: str) -> TaskRecord:
        return await self._ask("task", TaskQuery(task_id=task_id), TaskRecord)

    async def tasks(self, limit: int = 50) -> list[TaskRecord]:
        return (await self._ask("list", ListRequest(limit=limit), TaskList)).records

    async def wait(self, task_id: str, timeout: float) -> WaitReply:
        hold = min(MAX_WAIT, max(0.1, timeout))
        return await self._ask("wait", WaitRequest(task_id=task_id, timeout=hold), WaitReply, timeout=hold + 10.0)

    async def result(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Wait until the task ends (long-polling the gateway); ``TimeoutError`` after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            while True:
                reply = await self.wait(task_id, MAX_WAIT)
                if reply.record.status.terminal:
                    return reply.record

    async def progress(self, task_id: str) -> AsyncIterator[Event]:
        """The task's progress as it changes (the latest event each time the gateway answers), until it ends."""
        last: dict[str, Any] | None = None
        while True:
            reply = await self.wait(task_id, 2.0)
            if reply.progress is not None and reply.progress != last:
                last = reply.progress
                topic = self.bus.subjects.task_progress_topic(reply.record.kind, task_id)
                yield Event(topic=topic, source=GATEWAY, data=last)
            if reply.record.status.terminal:
                return
