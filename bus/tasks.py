"""Durable tasks on a JetStream work queue.

Submit: only a kind that is served is accepted: one with a durable consumer on the task stream (workers create it
when they start, and it outlives them). Any other kind (a typo) is refused with the served kinds before anything
is written (``UnknownKindError``), unless the caller says it queues for a worker yet to come (``require_worker``).
Then the task record is created in the task bucket (``pending``) and the envelope is published with
``Nats-Msg-Id`` = task id. Re-submitting an id that exists runs nothing new; but a ``pending`` record that no
delivery has picked up yet (its submit may have been cut off between the record and the publish) is published
again, so re-submitting after a failed submit always makes the task run. It cannot make it run twice: within
the stream's duplicate window the server drops the copy; after it, whichever copy is delivered first takes the
task (the record names its message), and a worker acknowledges any other copy without running it.

Work: replicas share one durable pull consumer per task kind. For each message the worker marks the record
``running`` (owned by that message), runs the handler while sending ``in_progress()`` heartbeats, stores the
outcome with a compare-and-swap (``succeeded`` / ``failed`` / ``dead``), and only then acks. A retryable failure
naks with the kind's backoff delay; a permanent one, or the last delivery failing, goes to the dead-letter stream
with its reason and delivery count. A handler running past the kind's timeout is cancelled, its heartbeat stops,
and the task fails (``timeout``) without a retry. A crash before the ack means redelivery, never loss; a redelivered
task whose result is already stored is acked without running again, so no task ends with two different results.
A message that is not a task envelope of the consumer's own kind (garbage, an envelope whose ``kind`` disagrees
with its subject, or whose ``id`` is not its ``Nats-Msg-Id``) is dead-lettered as ``invalid-<stream sequence>``
with the reason and never run; it touches no other task's record.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import anyio
import pydantic_core
from anyio.abc import TaskStatus as AnyioTaskStatus
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import MaxPayloadError as NatsMaxPayloadError
from nats.errors import NoRespondersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as JetStreamNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field, field_validator

from dspyrt.bus import tracing
from dspyrt.bus.audit import record_audit
from dspyrt.bus.claims import ClaimStore, ObjectRef
from dspyrt.bus.connection import Bus
from dspyrt.bus.errors import (
    BusUnavailableError,
    DspyrtError,
    ErrorBody,
    MessageValidationError,
    PermanentError,
    RetryableError,
    UnknownKindError,
    is_permanent,
)
from dspyrt.bus.errors import (
    NotFoundError as TaskNotFoundError,
)
from dspyrt.bus.messages import (
    CLIENT_HEADER,
    MSG_ID_HEADER,
    RECORD_REV_HEADER,
    TASK_ID_HEADER,
    Message,
    check_size,
    clip,
    decode,
    error_body,
)
from dspyrt.bus.pull import Puller
from dspyrt.bus.streams import key_value, kv_keys, kv_keys_matching, kv_update

log = logging.getLogger("dspyrt.tasks")

TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
TASK_KIND = re.compile(r"^[A-Za-z0-9_-]+$")  # one subject token (bus.subjects.check_token)
TASK_KEY = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{1,128}$")  # <kind>.<task id>
# A task id prefix matching at most this many keys has each checked (a deleted task's key may still be listed).
MAX_CHECKED_CANDIDATES = 20
# A dead letter keeps the task message for replay up to this size.
MAX_DEAD_LETTER_BODY = 256 * 1024
# Room a result leaves under max_payload for the rest of its task record and the headers.
RESULT_HEADROOM = 8192
# A result larger than this (JSON bytes) is claim-checked: stored in the results object store, its record keeping
# the reference and the result's summary. Over MAX_RESULT_BYTES it is refused (payload_too_large).
INLINE_RESULT_LIMIT = 256 * 1024
MAX_RESULT_BYTES = 256 * 1024 * 1024
# How long a submit that failed after writing its record tries to take the record back.
FORGET_TIMEOUT = 2.0
# JetStream's error code for "stream not found".
STREAM_NOT_FOUND = 10059
# A replayed task's Nats-Msg-Id is <task id><REPLAY_MARK><milliseconds>.
REPLAY_MARK = "-replay-"


class TaskStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.DEAD)


def new_task_id() -> str:
    return uuid.uuid4().hex


def check_task_id(value: str) -> str:
    if not TASK_ID.match(value):
        raise ValueError("a task id is 1-128 letters, digits, '_' or '-'")
    return value


def task_key(kind: str, task_id: str) -> str:
    """A task record's key in the task bucket: ``<kind>.<task id>`` (the kind lets permissions tell kinds apart)."""
    if not TASK_KIND.match(kind):
        raise ValueError(f"task kind {kind!r} must be letters, digits, '_' or '-'")
    return f"{kind}.{check_task_id(task_id)}"


def pick_task_id(prefix: str, candidates: Iterable[str], max_listed: int = 10) -> str:
    """The one task id that ``prefix`` abbreviates, among the ids that start with it (``candidates``).

    Tasks a task starts are named after it (a cycle's ``<id>-base``, ``<id>-opt-eval-s0``): a prefix that matches
    one task and such children of it means that task. No candidate: :class:`~dspyrt.bus.errors.NotFoundError`; several
    unrelated ones: ``DspyrtError`` ``ambiguous_id`` naming them (up to ``max_listed``)."""
    ids = sorted(set(candidates))
    present = set(ids)

    def started_by_another(task_id: str) -> bool:  # "<other id>-<suffix>" with <other id> a candidate
        parts = task_id.split("-")
        return any("-".join(parts[:n]) in present for n in range(1, len(parts)))

    roots = [i for i in ids if not started_by_another(i)]
    if not roots:
        raise TaskNotFoundError(f"no task with id {prefix}, nor one whose id starts with it")
    if len(roots) == 1:
        return roots[0]
    shown = ", ".join(roots[:max_listed])
    more = f" and {len(roots) - max_listed} more" if len(roots) > max_listed else ""
    children = len(ids) - len(roots)
    started = f" (and {children} task{'s' if children != 1 else ''} they started)" if children else ""
    raise DspyrtError(
        f"{prefix} is the start of {len(roots)} task ids: {shown}{more}{started}; give more of the id",
        code="ambiguous_id",
    )


class TaskEnvelope(Message):
    """What goes on ``dspy.task.<kind>``: the task's identity and its (not yet validated) input."""

    id: str
    kind: str
    input: dict[str, Any] = Field(default_factory=dict)
    submitted_by: str | None = None
    submitted_at: float = Field(default_factory=time.time)

    _check_id = field_validator("id")(classmethod(lambda cls, v: check_task_id(v)))


class TaskRecord(BaseModel):
    """A task's state in the task bucket, keyed by ``<kind>.<task id>``."""

    id: str
    kind: str
    status: TaskStatus
    attempts: int = 0
    submitted_by: str | None = None
    submitted_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    worker: str | None = None
    trace_id: str | None = None
    result: Any = None
    # Set when the result was too large to keep here: ``result`` then holds its summary (or nothing), the whole
    # result is this object (``load_result``).
    result_ref: ObjectRef | None = None
    error: ErrorBody | None = None
    # Stream sequence of the task message whose delivery took the task (None: no delivery has yet). Another copy
    # of the message (a re-submit after the duplicate window) is acknowledged without running.
    message_seq: int | None = None


class DeadLetter(BaseModel):
    """A task that will not run again by itself, with why and how often it was tried."""

    task_id: str
    kind: str
    reason: ErrorBody
    deliveries: int
    dead_at: float = Field(default_factory=time.time)
    envelope: str  # the original message body, verbatim, for replay


# ----------------------------------------------------------------------------- records


class TaskStore:
    """Task records in KV under ``<kind>.<task id>``, so the server's subject permissions can tell kinds apart
    (an agent writes the records of its own kinds only). Writes that end a task are compare-and-swap, so the first
    outcome wins.

    Whoever knows the kind passes it (``kind=``); a lookup by bare task id finds the key once with a filtered key
    listing (``*.<task id>``) and remembers it. Records written under a bare task id (before kinds were part of
    the key) are not found and not listed.
    """

    # Keys found by a listing that are remembered (the oldest are forgotten first).
    MAX_REMEMBERED_KEYS = 10_000

    def __init__(self, kv: KeyValue, bucket: str, js: JetStreamContext) -> None:
        self.kv = kv
        self.bucket = bucket
        self.js = js
        self._keys: dict[str, str] = {}  # task id -> key, for lookups by bare id

    @classmethod
    async def open(cls, bus: Bus) -> TaskStore:
        return cls(await key_value(bus, bus.subjects.task_bucket), bus.subjects.task_bucket, bus.js)

    def key_subject(self, task_id: str, kind: str | None = None) -> str:
        """Where KV announces every write of this record (the KV protocol's own subject); without ``kind``, a
        pattern matching the task's record whatever its kind."""
        return f"$KV.{self.bucket}.{task_key(kind, task_id) if kind else '*.' + check_task_id(task_id)}"

    async def find_key(self, task_id: str, kind: str | None = None) -> str | None:
        """The key of the task's record: ``<kind>.<task id>`` when the kind is given, else the one a filtered
        key listing finds (of a record that exists; the first written if the id is under several kinds), or None.

        The first, not the newest: submit refuses an id already taken under another kind, so a later record under
        another kind can only be an agent writing into its own kind's keys to shadow someone else's task."""
        if kind is not None:
            return task_key(kind, task_id)
        check_task_id(task_id)
        known = self._keys.get(task_id)
        if known is not None:
            return known
        keys = await kv_keys_matching(self.js, self.bucket, f"*.{task_id}")
        if len(keys) > 1:  # rare (see submit_task); a key listed may also be deleted: take the first record
            revisions = {key: entry[1] for key in keys if (entry := await self._read(key)) is not None}
            keys = sorted(revisions, key=revisions.__getitem__)
        if not keys:
            return None
        self._remember(task_id, keys[0])
        return keys[0]

    def _remember(self, task_id: str, key: str) -> None:
        if len(self._keys) >= self.MAX_REMEMBERED_KEYS:
            self._keys.pop(next(iter(self._keys)))
        self._keys[task_id] = key

    async def get(self, task_id: str, kind: str | None = None) -> TaskRecord | None:
        entry = await self.entry(task_id, kind)
        return entry[0] if entry else None

    async def entry(self, task_id: str, kind: str | None = None) -> tuple[TaskRecord, int] | None:
        """The record and its revision, or None."""
        key = await self.find_key(task_id, kind)
        if key is None:
            return None
        entry = await self._read(key)
        if entry is None and kind is None:
            self._keys.pop(task_id, None)  # deleted since it was found: look again next time
        return entry

    async def _read(self, key: str) -> tuple[TaskRecord, int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return TaskRecord.model_validate_json(entry.value), int(entry.revision or 0)

    async def create(self, record: TaskRecord) -> int:
        """Store a new record; its revision, or 0 if the id already exists (for its kind)."""
        try:
            return int(await self.kv.create(task_key(record.kind, record.id), record.model_dump_json().encode()))
        except KeyWrongLastSequenceError:
            return 0

    async def transition(
        self, task_id: str, change: Callable[[TaskRecord | None], TaskRecord | None], *, kind: str
    ) -> TaskRecord | None:
        """Apply ``change`` to the current record with CAS, retrying on races. ``None`` from change: no write."""
        return (await self.transition_from(task_id, change, kind=kind))[0]

    async def transition_from(
        self,
        task_id: str,
        change: Callable[[TaskRecord | None], TaskRecord | None],
        known: tuple[TaskRecord, int] | None = None,
        *,
        kind: str,
    ) -> tuple[TaskRecord | None, int]:
        """``transition`` that may start from a record and revision the caller already knows (saving a read;
        a stale guess costs one failed compare-and-swap, then the record is read). Returns the record and
        its revision."""
        outcome: TaskRecord | None = None  # what the last application of change left: the new or the kept record

        def apply(raw: bytes | None) -> bytes | None:
            nonlocal outcome
            record = TaskRecord.model_validate_json(raw) if raw else None
            new = change(record)
            if new is None:
                outcome = record
                return None
            new.updated_at = time.time()
            outcome = new
            return new.model_dump_json().encode()

        start = (known[0].model_dump_json().encode(), known[1]) if known is not None else None
        stored = await kv_update(self.kv, task_key(kind, task_id), apply, known=start)
        return outcome, stored.revision

    async def delete(self, task_id: str, *, kind: str, last: int | None = None) -> None:
        """Delete the record; with ``last``, only if it is still at that revision (else the server refuses)."""
        await self.kv.delete(task_key(kind, task_id), last=last)
        if self._keys.get(task_id) == task_key(kind, task_id):
            del self._keys[task_id]

    async def ids_with_prefix(self, prefix: str) -> list[str]:
        """The ids of the stored tasks that start with ``prefix``, sorted (each once, whatever its kinds).

        One listing of the bucket's keys (``kv_keys_matching``: one JetStream request, answered with at most the
        server's limit of subject details, 100,000 keys), filtered here: NATS wildcards match whole tokens only.
        A task deleted since may still be listed (its delete marker is a key): check it with :meth:`get`."""
        if not prefix or not TASK_ID.match(prefix):
            return []
        keys = await kv_keys_matching(self.js, self.bucket, ">")
        return sorted({key.partition(".")[2] for key in keys if key.partition(".")[2].startswith(prefix)})

    async def resolve_id(self, prefix: str) -> str:
        """The full id of the one task whose id is ``prefix`` or starts with it (like git's abbreviated commits).

        An exact id wins over longer ids it is a prefix of, and a task wins over the tasks it started (see
        :func:`pick_task_id`). Raises :class:`~dspyrt.bus.errors.NotFoundError` when no task matches, and
        ``DspyrtError`` with code ``ambiguous_id`` naming the candidates when several do."""
        if not TASK_ID.match(prefix):
            raise TaskNotFoundError(f"no task with id {prefix!r} (a task id is 1-128 letters, digits, '_' or '-')")
        if await self.get(prefix) is not None:
            return prefix
        candidates = await self.ids_with_prefix(prefix)
        if len(candidates) <= MAX_CHECKED_CANDIDATES:  # drop deleted ones: their delete markers are keys too
            candidates = [task_id for task_id in candidates if await self.get(task_id) is not None]
        return pick_task_id(prefix, candidates)

    async def list(self, limit: int = 50) -> list[TaskRecord]:
        """The most recently updated records."""
        keys = [k for k in await kv_keys(self.kv) if TASK_KEY.match(k)]
        records = [entry[0] for entry in [await self._read(k) for k in keys] if entry is not None]
        records.sort(key=lambda r: r.updated_at, reverse=True)
        return records[:limit]


# ----------------------------------------------------------------------------- submit side


@dataclass(frozen=True)
class Submission:
    task_id: str
    created: bool  # False: the id existed already
    # With created False: its pending record had not been picked up, and the envelope was queued again (a submit
    # cut off between its record and its publish is completed). False when the server dropped it as a duplicate.
    requeued: bool = False


class TaskKinds:
    """Which task kinds are served: those with a durable consumer on the task stream. Workers create a kind's
    consumer when they start and it outlives them, so a kind that was ever served keeps its queue.

    One JetStream API request (``CONSUMER.NAMES`` on the task stream) answers for every kind; a served kind is
    remembered for ``ttl`` seconds, an unknown one is asked about again before it is refused (a worker may have
    just started).
    """

    def __init__(self, bus: Bus, *, ttl: float = 10.0, timeout: float = 5.0) -> None:
        self.bus = bus
        self.ttl = ttl
        self.timeout = timeout
        self._served: frozenset[str] = frozenset()
        self._asked_at = -math.inf  # monotonic time the cached answer was asked for
        self._lock = anyio.Lock()

    async def served(self) -> frozenset[str]:
        """The kinds served now (asks the server)."""
        s = self.bus.subjects
        head = s.task_consumer("x")[:-1]  # the consumer name of a kind is head + kind
        names: set[str] = set()
        offset = 0
        while True:
            reply = await self._names(s.task_stream, offset)
            page = [str(name) for name in reply.get("consumers") or []]
            names.update(page)
            offset += len(page)
            if not page or offset >= int(reply.get("total") or 0):
                break
        kinds = set()
        for name in names:
            kind = name.removeprefix(head)
            if kind != name and TASK_KIND.match(kind):
                kinds.add(kind)
        return frozenset(kinds)

    async def _names(self, stream: str, offset: int) -> dict[str, Any]:
        subject = f"{api.DEFAULT_PREFIX}.CONSUMER.NAMES.{stream}"
        try:
            msg = await self.bus.nc.request(subject, json.dumps({"offset": offset}).encode(), timeout=self.timeout)
        except NoRespondersError as exc:
            raise BusUnavailableError(f"JetStream did not answer {subject} (no responders)") from exc
        except (NatsTimeoutError, TimeoutError) as exc:
            raise DspyrtError(
                f"no answer on {subject} within {self.timeout:g}s (JetStream busy, or this user may not ask it), "
                "so whether the kind is served is unknown; nothing was submitted",
                code="timeout",
            ) from exc
        reply: dict[str, Any] = json.loads(msg.data)
        error = reply.get("error")
        if isinstance(error, dict):
            if error.get("err_code") == STREAM_NOT_FOUND:
                return {"consumers": [], "total": 0}
            raise DspyrtError(f"{subject}: {error.get('description', error)}", code="unavailable")
        return reply

    async def check(self, kind: str) -> None:
        """Return if ``kind`` is served; raise :class:`UnknownKindError` if it is not."""
        asked = time.monotonic()
        if kind in self._served and asked - self._asked_at < self.ttl:
            return
        async with self._lock:
            # An answer asked for after this call began is as fresh as one we would ask for now.
            if self._asked_at < asked:
                started = time.monotonic()
                self._served = await self.served()
                self._asked_at = started
            if kind not in self._served:
                raise UnknownKindError(kind, self._served, self.bus.subjects.task_stream)


def _task_headers(task_id: str, revision: int, submitted_by: str | None) -> dict[str, str]:
    # The record's revision rides along, so the worker's first write needs no read.
    headers = tracing.inject({MSG_ID_HEADER: task_id, TASK_ID_HEADER: task_id, RECORD_REV_HEADER: str(revision)})
    if submitted_by:
        headers[CLIENT_HEADER] = submitted_by
    return headers


async def submit_task(
    bus: Bus,
    store: TaskStore,
    kind: str,
    input: dict[str, Any],
    *,
    task_id: str | None = None,
    submitted_by: str | None = None,
    require_worker: bool = True,
    kinds: TaskKinds | None = None,
) -> Submission:
    """Record and publish a task.

    A kind no worker serves is refused (:class:`UnknownKindError`) before anything is written, unless
    ``require_worker`` is false: then the task waits in the queue for the first worker of its kind. ``kinds``
    remembers served kinds between calls (else every call asks once).

    Submitting an existing id again returns that id with ``created`` false and runs nothing new; a ``pending``
    record that no delivery has picked up is published again (``requeued``), which completes a submit that failed
    between writing the record and publishing it (see the module's delivery guarantees).
    """
    given = task_id is not None
    task_id = check_task_id(task_id) if task_id else new_task_id()
    subject = bus.subjects.task(kind)
    envelope = TaskEnvelope(id=task_id, kind=kind, input=input, submitted_by=submitted_by)
    data = check_size(envelope.model_dump_json().encode(), bus.max_payload, f"task {kind}")
    if require_worker:
        await (kinds or TaskKinds(bus)).check(kind)
    if given:
        # Keys name the kind, so the bucket would take the same id under a second kind; but an id names one task
        # (and one message id in the stream's duplicate window), so an id taken by another kind is not new.
        holder = await store.get(task_id)
        if holder is not None and holder.kind != kind:
            return Submission(task_id, created=False)
    with tracing.send_span(subject, size=len(data), message_id=task_id) as span:
        record = TaskRecord(
            id=task_id,
            kind=kind,
            status=TaskStatus.PENDING,
            submitted_by=submitted_by,
            trace_id=tracing.current_trace_id(),
        )
        for _ in range(3):
            revision = await store.create(record)
            if revision:
                break
            existing = await store.entry(task_id, kind)
            if existing is None:
                continue  # deleted in between (a failed submit taking its record back): the id is free again
            span.set_attribute("dspyrt.task.duplicate", True)
            current, current_revision = existing
            if current.status is not TaskStatus.PENDING or current.message_seq is not None or current.kind != kind:
                return Submission(task_id, created=False)
            # Pending and never picked up: its message may never have been published. Publish it again under the
            # same message id: the server drops it if the first one is still inside the duplicate window.
            ack = await bus.js.publish(subject, data, headers=_task_headers(task_id, current_revision, submitted_by))
            span.set_attribute("dspyrt.task.requeued", not ack.duplicate)
            if not ack.duplicate:
                detail = {"kind": kind, "requeued": True}
                await record_audit(bus, "task.submit", task_id, identity=submitted_by, detail=detail)
            return Submission(task_id, created=False, requeued=not ack.duplicate)
        else:
            raise DspyrtError(f"task {task_id}: its record keeps changing; submit it again", code="conflict")
        try:
            await bus.js.publish(subject, data, headers=_task_headers(task_id, revision, submitted_by))
        except BaseException:
            await _forget(store, kind, task_id, revision)
            raise
        await record_audit(bus, "task.submit", task_id, identity=submitted_by, detail={"kind": kind})
    return Submission(task_id, created=True)


async def _forget(store: TaskStore, kind: str, task_id: str, revision: int) -> None:
    """After a failed publish, take the pending record back if nothing has touched it, so a submit that failed
    leaves nothing behind. If that fails too (the server is gone), the record stays ``pending``: submitting the
    same id again publishes it. If the publish did reach the stream after all, the worker recreates the record."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(FORGET_TIMEOUT):
        try:
            await store.delete(task_id, kind=kind, last=revision)
        except Exception as exc:
            log.debug("task %s: pending record of a failed submit left in place (%s)", task_id, exc)


async def _read_through_failover(store: TaskStore, task_id: str, kind: str | None) -> TaskRecord | None:
    """Read a record; a cluster fail-over or reconnect (timeouts, no responders) is waited out, not reported."""
    delay = 0.1
    while True:
        try:
            return await store.get(task_id, kind)
        except (NatsTimeoutError, TimeoutError, NoRespondersError, OutboundBufferLimitError):
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def wait_for_task(
    bus: Bus, store: TaskStore, task_id: str, timeout: float | None = None, *, kind: str | None = None
) -> TaskRecord:
    """Wait until the task reaches a terminal state, watching its KV key (no polling).

    Pass ``kind`` when it is known (a parent waiting for its child): the watch is then on that kind's key only,
    which is all an agent's permissions allow. Without it the watch matches the id under any kind."""
    # Subscribe before the first read so no update can slip between them.
    sub = await bus.nc.subscribe(store.key_subject(check_task_id(task_id), kind))
    try:
        with anyio.fail_after(timeout):
            record = await _read_through_failover(store, task_id, kind)
            if record is None:
                raise TaskNotFoundError(f"no task with id {task_id}")
            kind = record.kind  # found: every later read goes to its key
            while not record.status.terminal:
                try:  # a missed update (say, during a reconnect) costs at most a second
                    await sub.next_msg(timeout=1.0)
                except NatsTimeoutError:
                    pass
                record = await _read_through_failover(store, task_id, kind) or record
            return record
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()


async def load_result(claims: ClaimStore, record: TaskRecord) -> Any:
    """The task's whole result: ``record.result``, or the claim-checked object its ``result_ref`` names."""
    if record.result_ref is None:
        return record.result
    return json.loads(await claims.get(record.result_ref))


# ----------------------------------------------------------------------------- work side


@dataclass
class TaskRun:
    """What a handler gets beside the envelope: its attempt number and a heartbeat it may call."""

    envelope: TaskEnvelope
    attempt: int
    msg: Msg

    async def heartbeat(self) -> None:
        """Tell JetStream the task is still being worked on (resets the ack timer)."""
        await self.msg.in_progress()


TaskHandler = Callable[[TaskEnvelope, TaskRun], Awaitable[Any]]


def replay_message_id(task_id: str) -> str:
    """The ``Nats-Msg-Id`` of a replayed task: fresh (the original id may still be inside the duplicate window)
    and still naming its task, as the worker checks (:func:`message_id_names`)."""
    return f"{task_id}{REPLAY_MARK}{math.floor(time.time() * 1000)}"


def message_id_names(msg_id: str | None, task_id: str) -> bool:
    """Whether a task message's ``Nats-Msg-Id`` is its task's own: the task id, or a replay's (``<id>-replay-<ms>``)."""
    if msg_id == task_id:
        return True
    if msg_id is None:
        return False
    head, mark, stamp = msg_id.rpartition(REPLAY_MARK)
    return bool(mark) and head == task_id and stamp.isascii() and stamp.isdigit()


def refusal(envelope: TaskEnvelope, kind: str, subject: str, msg_id: str | None) -> ErrorBody | None:
    """Why a task message that parsed must not run as the task it claims to be (None: it may).

    - its ``kind`` is not its subject's: run as the subject's kind it would feed one kind's input to another's
      handler;
    - its ``id`` is not its ``Nats-Msg-Id``: the stream drops a second copy of a task only by that header, so a
      message under another message id (or none) would slip past the duplicate window.
    """
    if envelope.kind != kind:
        return ErrorBody(
            code="kind_mismatch",
            message=clip(
                f"task {envelope.id!r} says kind {envelope.kind!r} but came on {subject} (kind {kind!r}); "
                f"not run. Submit it as {envelope.kind!r}."
            ),
        )
    if not message_id_names(msg_id, envelope.id):
        header = "no Nats-Msg-Id header" if msg_id is None else f"Nats-Msg-Id {clip(msg_id, 160)!r}"
        return ErrorBody(
            code="id_mismatch",
            message=clip(
                f"task {envelope.id!r} came on {subject} with {header}; not run: a task message's Nats-Msg-Id "
                "is its task id (submit it with Client.submit or 'dspyrt submit')."
            ),
        )
    return None


@dataclass(frozen=True)
class WorkerOptions:
    """How one task kind is consumed. ``backoff`` is the nak delay per attempt (the last value repeats).

    Retries are ``nak(delay)`` per failure, and ``max_deliver`` is the consumer's: JetStream's consumer ``backoff``
    list is not used, because it would also replace ``ack_wait`` as the time a delivery may go without a heartbeat.
    ``timeout``: the run-time limit of one attempt (None: none); past it the handler is cancelled, its heartbeat
    stops and the task fails with code ``timeout``, not retried."""

    ack_wait: float = 30.0
    max_deliver: int = 5
    backoff: tuple[float, ...] = (1.0, 5.0, 15.0, 60.0)
    timeout: float | None = None
    concurrency: int = 8
    fetch_timeout: float = 1.0
    # Messages pulled per request, at most the free slots. None: all free slots while this kind's tasks have taken
    # under ``short_task`` seconds on average (one round trip brings many tiny tasks), else 1 (long tasks spread
    # evenly over replicas instead of landing on whichever asked first).
    fetch_batch: int | None = None
    short_task: float = 0.1
    # In-flight handlers get this long to finish on shutdown; the rest stay unacked for redelivery.
    drain_grace: float = 10.0
    # Results larger than this (JSON bytes, and never more than fits in a record) go to the results object store.
    inline_result_limit: int = INLINE_RESULT_LIMIT

    def delay(self, attempt: int) -> float:
        return self.backoff[min(attempt - 1, len(self.backoff) - 1)] if self.backoff else 0.0


@dataclass
class WorkerStats:
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    dead: int = 0
    duplicates: int = 0
    in_flight: int = 0
    busy_seconds: float = 0.0
    last_error: str = ""


@dataclass
class TaskWorker:
    """Consumes one task kind with a concurrency limit. ``await tg.start(worker.run)``; cancel to drain."""

    bus: Bus
    store: TaskStore
    kind: str
    handler: TaskHandler
    options: WorkerOptions = field(default_factory=WorkerOptions)
    worker_name: str = "worker"
    stats: WorkerStats = field(default_factory=WorkerStats)
    # Each running handler's own (shielded) cancel scope: stopping the worker does not cancel handlers,
    # the drain in ``run`` gives them ``drain_grace`` and then cancels what is left through these.
    _running: set[anyio.CancelScope] = field(default_factory=set, init=False, repr=False)
    _claims: ClaimStore | None = field(default=None, init=False, repr=False)

    async def _subscribe(self) -> Puller:
        s = self.bus.subjects
        durable = s.task_consumer(self.kind)
        try:
            current: api.ConsumerConfig | None = (await self.bus.js.consumer_info(s.task_stream, durable)).config
        except JetStreamNotFoundError:
            current = None
        if current is None:
            config = api.ConsumerConfig(
                name=durable,
                durable_name=durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.options.ack_wait,
                max_deliver=self.options.max_deliver,
                filter_subject=s.task(self.kind),
                max_ack_pending=-1,
            )
            await self.bus.js.add_consumer(s.task_stream, config)
        elif current.max_deliver != self.options.max_deliver or not math.isclose(
            current.ack_wait or 0.0, self.options.ack_wait, rel_tol=1e-6
        ):
            # The consumer outlives its workers: the policy the code declares now wins over the one it was created
            # with. A server stopping at an older, lower max_deliver would leave the task in the queue for good (the
            # exhausted-task watcher trusts no advisory short of this worker's max_deliver).
            update = current.evolve(max_deliver=self.options.max_deliver, ack_wait=self.options.ack_wait)
            await self.bus.js.add_consumer(s.task_stream, update)
        puller = Puller(self.bus, s.task_pull(self.kind))
        await puller.start()
        return puller

    def batch_limit(self) -> int:
        """The most messages one pull may take (see ``WorkerOptions.fetch_batch``)."""
        if self.options.fetch_batch is not None:
            return max(1, self.options.fetch_batch)
        done = self.stats.received - self.stats.in_flight
        if done and self.stats.busy_seconds / done < self.options.short_task:
            return self.options.concurrency
        return 1

    async def run(self, *, task_status: AnyioTaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        puller = await self._subscribe()
        watcher: Any = await ExhaustedTaskWatcher(self.bus, self.store, self.kind, self.options.max_deliver).start()
        limiter = anyio.Semaphore(self.options.concurrency, fast_acquire=True)
        try:
            async with anyio.create_task_group() as handlers:
                task_status.started()
                try:
                    await self._fetch_loop(puller, limiter, handlers)
                finally:
                    # Stop fetching; give in-flight handlers a grace period, then cancel them (they nak).
                    with anyio.CancelScope(shield=True):
                        # Unsubscribe first: a pull request of ours still open at the server would otherwise
                        # take what the handlers hand back, and strand it here until its ack_wait.
                        try:
                            await puller.close()
                        except Exception:
                            pass
                        with anyio.move_on_after(self.options.drain_grace):
                            while self.stats.in_flight:
                                await anyio.sleep(0.02)
                        for scope in self._running:
                            scope.cancel()
                        handlers.cancel_scope.cancel()
        finally:
            # In a finally: on cancellation nothing after the task group runs. Drain rather than
            # unsubscribe: an advisory being handled now is never sent again.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.options.drain_grace):
                try:
                    await watcher.drain()
                except Exception:
                    pass

    async def _fetch_loop(self, puller: Puller, limiter: anyio.Semaphore, handlers: anyio.abc.TaskGroup) -> None:
        errors = 0
        while True:
            await limiter.acquire()
            slots, limit = 1, self.batch_limit()
            while slots < limit:
                try:
                    limiter.acquire_nowait()
                except anyio.WouldBlock:
                    break
                slots += 1
            try:
                msgs = await puller.fetch(slots, timeout=self.options.fetch_timeout)
                errors = 0
            except Exception as exc:  # disconnected, server restarting: keep trying
                msgs = []
                errors += 1
                log.debug("fetch %s failed (%s)", self.kind, exc)
                await anyio.sleep(min(0.1 * 2**errors, 2.0))
            for _ in range(slots - len(msgs)):
                limiter.release()
            for msg in msgs:
                handlers.start_soon(self._handle, msg, limiter)

    async def _handle(self, msg: Msg, limiter: anyio.Semaphore) -> None:
        self.stats.received += 1
        self.stats.in_flight += 1
        started = time.perf_counter()
        with anyio.CancelScope(shield=True) as scope:
            self._running.add(scope)
            try:
                await self._process(msg)
            except anyio.get_cancelled_exc_class():
                # Drain grace is over: hand it back at once rather than after ack_wait.
                with anyio.CancelScope(shield=True):
                    try:
                        await msg.nak()
                    except Exception:
                        pass
                raise
            except Exception as exc:  # never let one message kill the worker
                log.exception("task %s: unexpected worker failure", self.kind)
                self.stats.last_error = repr(exc)
            finally:
                self._running.discard(scope)
                self.stats.in_flight -= 1
                self.stats.busy_seconds += time.perf_counter() - started
                limiter.release()

    async def _process(self, msg: Msg) -> None:
        subject = msg.subject
        attempt = int(msg.metadata.num_delivered or 1)
        headers = msg.headers or {}
        with tracing.process_span(
            subject,
            headers,
            size=len(msg.data),
            message_id=headers.get(TASK_ID_HEADER),
            consumer_group=self.bus.subjects.task_consumer(self.kind),
        ) as span:
            seq = int(msg.metadata.sequence.stream)
            try:
                envelope = decode(TaskEnvelope, msg.data)
            except MessageValidationError as exc:
                # Never under the id its header claims: a garbage message must not fail someone else's task.
                await self._dead_letter(msg, f"invalid-{seq}", error_body(exc), attempt, TaskStatus.FAILED)
                tracing.mark_error(span, exc.code, exc.message)
                return
            reason = refusal(envelope, self.kind, subject, headers.get(MSG_ID_HEADER))
            if reason is not None:
                # Its claimed id is not vouched for: dead-lettered like garbage, under the message's own sequence.
                await self._dead_letter(msg, f"invalid-{seq}", reason, attempt, TaskStatus.FAILED)
                tracing.mark_error(span, reason.code, reason.message)
                return
            span.set_attribute("dspyrt.task.id", envelope.id)
            span.set_attribute("dspyrt.task.attempt", attempt)

            def start(record: TaskRecord | None) -> TaskRecord | None:
                if record is not None and (record.status.terminal or record.message_seq not in (None, seq)):
                    return None  # finished, or taken by another copy of this task's message
                base = record or TaskRecord(
                    id=envelope.id,
                    kind=envelope.kind,
                    status=TaskStatus.PENDING,
                    submitted_by=envelope.submitted_by,
                    submitted_at=envelope.submitted_at,
                )
                return base.model_copy(
                    update={
                        "status": TaskStatus.RUNNING,
                        "attempts": attempt,
                        "worker": self.worker_name,
                        "trace_id": tracing.current_trace_id(),
                        "message_seq": seq,
                    }
                )

            known = None
            rev_header = headers.get(RECORD_REV_HEADER, "")
            if attempt == 1 and rev_header.isascii() and rev_header.isdigit() and len(rev_header) < 20:
                pending = TaskRecord(
                    id=envelope.id, kind=envelope.kind, status=TaskStatus.PENDING,
                    submitted_by=envelope.submitted_by, submitted_at=envelope.submitted_at,
                )  # fmt: skip
                known = (pending, int(headers[RECORD_REV_HEADER]))
            record, revision = await self.store.transition_from(envelope.id, start, known, kind=self.kind)
            if record is not None and (record.status.terminal or record.message_seq != seq):
                # Already finished by an earlier delivery, or another copy of the message has it (it is redelivered
                # if its worker dies): do not run twice.
                self.stats.duplicates += 1
                span.set_attribute("dspyrt.task.duplicate", True)
                await msg.ack()
                return

            run = TaskRun(envelope, attempt, msg)
            try:
                result = await self._run_with_heartbeat(envelope, run)
            except Exception as exc:
                body = error_body(exc)
                tracing.mark_error(span, body.code, body.message)
                if is_permanent(exc):
                    await self._dead_letter(msg, envelope.id, body, attempt, TaskStatus.FAILED)
                    return
                self.stats.last_error = body.message
                if attempt >= self.options.max_deliver:
                    body = ErrorBody(
                        code="exhausted",
                        message=f"failed on all {attempt} deliveries; last error {body.code}: {body.message}",
                    )
                    await self._dead_letter(msg, envelope.id, body, attempt, TaskStatus.DEAD)
                    return
                await self._retry(msg, envelope.id, body, attempt, exc)
                return
            await self._succeed(msg, envelope.id, result, (record, revision) if record is not None else None)

    async def _run_with_heartbeat(self, envelope: TaskEnvelope, run: TaskRun) -> Any:
        """The handler's result, with ``in_progress()`` heartbeats while it runs, within ``options.timeout``."""
        interval = max(self.options.ack_wait / 3, 0.05)
        limit = self.options.timeout
        deadline = anyio.current_time() + (limit if limit is not None else math.inf)
        outcome: list[Any] = []
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:

            async def beat() -> None:
                # Bounded by the deadline itself, not only by the handler's end: a handler that cannot be
                # cancelled (stuck in a thread) must not be kept alive by its heartbeat either.
                with anyio.CancelScope(deadline=deadline):
                    while True:
                        await anyio.sleep(interval)
                        try:
                            await run.heartbeat()
                        except Exception:
                            pass

            tg.start_soon(beat)
            with anyio.CancelScope(deadline=deadline) as run_scope:
                try:
                    outcome.append(await self.handler(envelope, run))
                except Exception as exc:
                    # Re-raised outside the task group, which would wrap it in an ExceptionGroup and so hide
                    # whether it is a PermanentError, a RetryableError (with its delay) or a validation error.
                    failure = exc
                finally:
                    tg.cancel_scope.cancel()
        if run_scope.cancel_called:
            # Whatever the handler did once cancelled (an error, even a result) came after its limit.
            raise PermanentError(
                f"task {self.kind} {envelope.id} ran longer than its timeout of {limit:g}s on attempt {run.attempt}; "
                "cancelled and not retried (a handler that hung once would hang again)",
                code="timeout",
            )
        if failure is not None:
            raise failure
        return outcome[0]

    async def _succeed(
        self, msg: Msg, task_id: str, result: Any, running: tuple[TaskRecord, int] | None = None
    ) -> None:
        payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        stored: Any = payload
        ref: ObjectRef | None = None
        reason: ErrorBody | None = None
        try:
            # The serializer that stores the record: what passes here is what it can store.
            data = pydantic_core.to_json(payload)
        except pydantic_core.PydanticSerializationError as exc:
            reason = ErrorBody(code="invalid_result", message=clip(f"task result is not JSON: {exc}"))
        else:
            inline = min(self.options.inline_result_limit, self.bus.max_payload - RESULT_HEADROOM)
            if len(data) > MAX_RESULT_BYTES:
                message = f"result is {len(data)} bytes, over the limit of {MAX_RESULT_BYTES}"
                reason = ErrorBody(code="payload_too_large", message=message)
            elif len(data) > inline:
                try:
                    ref, stored = await self._claim_check(task_id, data, result, inline)
                except NatsMaxPayloadError:  # the store cannot take it either: running again would not help
                    reason = error_body(NatsMaxPayloadError())
        if reason is not None:
            # Running it again would give the same result: fail it for good.
            await self._dead_letter(msg, task_id, reason, int(msg.metadata.num_delivered or 1), TaskStatus.FAILED)
            return

        def done(record: TaskRecord | None) -> TaskRecord | None:
            if record is not None and record.status.terminal:
                return None  # first outcome wins
            base = record or TaskRecord(id=task_id, kind=self.kind, status=TaskStatus.RUNNING)
            update = {"status": TaskStatus.SUCCEEDED, "result": stored, "result_ref": ref, "error": None}
            return base.model_copy(update=update)

        await self.store.transition_from(task_id, done, running, kind=self.kind)
        await msg.ack()
        self.stats.succeeded += 1

    async def _claim_check(self, task_id: str, data: bytes, result: Any, inline: int) -> tuple[ObjectRef, Any]:
        """Store a large result in the results object store: its reference, and the summary its record keeps
        (the result's ``record_summary()`` if it has one and it fits, else nothing)."""
        if self._claims is None:
            self._claims = await ClaimStore.open(self.bus)
        ref = await self._claims.put(f"{self.kind}/{task_id}.json", data)
        summarize = getattr(result, "record_summary", None)
        summary = summarize() if callable(summarize) else None
        if summary is not None and len(pydantic_core.to_json(summary)) > inline:
            summary = None
        return ref, summary

    async def _retry(self, msg: Msg, task_id: str, body: ErrorBody, attempt: int, exc: Exception) -> None:
        delay = exc.delay if isinstance(exc, RetryableError) and exc.delay is not None else self.options.delay(attempt)

        def back_to_pending(record: TaskRecord | None) -> TaskRecord | None:
            if record is None or record.status.terminal:
                return None
            return record.model_copy(update={"status": TaskStatus.PENDING, "error": body})

        await self.store.transition(task_id, back_to_pending, kind=self.kind)
        await msg.nak(delay=delay)
        self.stats.retried += 1
        log.info("task %s %s: attempt %d failed (%s), retry in %.1fs", self.kind, task_id, attempt, body.code, delay)

    async def _dead_letter(self, msg: Msg, task_id: str, body: ErrorBody, deliveries: int, status: TaskStatus) -> None:
        await dead_letter(self.bus, self.store, task_id, self.kind, body, deliveries, msg.data, status)
        await msg.term()
        if status is TaskStatus.DEAD:
            self.stats.dead += 1
        else:
            self.stats.failed += 1


async def dead_letter(
    bus: Bus,
    store: TaskStore,
    task_id: str,
    kind: str,
    reason: ErrorBody,
    deliveries: int,
    original: bytes,
    status: TaskStatus,
) -> None:
    """Record the outcome and publish the dead letter (stored before the message is let go)."""

    def end(record: TaskRecord | None) -> TaskRecord | None:
        if record is not None and record.status.terminal:
            return None
        base = record or TaskRecord(id=task_id, kind=kind, status=TaskStatus.PENDING)
        return base.model_copy(update={"status": status, "error": reason, "attempts": deliveries})

    if TASK_ID.match(task_id):
        await store.transition(task_id, end, kind=kind)
    # Kept verbatim for replay when it fits; a huge or undecodable body is described, not copied.
    try:
        text = original.decode() if len(original) <= MAX_DEAD_LETTER_BODY else ""
    except UnicodeDecodeError:
        text = ""
    letter = DeadLetter(task_id=task_id, kind=kind, reason=reason, deliveries=deliveries, envelope=text)
    await bus.js.publish(
        bus.subjects.dlq(kind), letter.model_dump_json().encode(), headers=tracing.inject({TASK_ID_HEADER: task_id})
    )


class ExhaustedTaskWatcher:
    """Dead-letters tasks whose every delivery crashed its worker before it could answer.

    JetStream stops redelivering after ``max_deliver`` and publishes an advisory; the message itself stays in
    the work queue. One watcher per consumer (queue group) moves it to the dead-letter stream.
    """

    def __init__(self, bus: Bus, store: TaskStore, kind: str, max_deliver: int) -> None:
        self.bus = bus
        self.store = store
        self.kind = kind
        self.max_deliver = max_deliver

    async def start(self) -> Subscription:
        """Subscribe to the advisories; unsubscribe the returned subscription to stop."""
        s = self.bus.subjects
        subject = s.max_deliveries_advisory(self.kind)
        return await self.bus.nc.subscribe(
            subject, queue=f"{s.task_consumer(self.kind)}-advisory", cb=self._on_advisory
        )

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            seq = int(advisory["stream_seq"])
            deliveries = int(advisory.get("deliveries", 0))
            if deliveries < self.max_deliver:
                # Only JetStream should publish here; anything else must not dead-letter a live task.
                raise ValueError(f"{deliveries} deliveries, fewer than max_deliver {self.max_deliver}")
            stored = await self.bus.js.get_msg(self.bus.subjects.task_stream, seq)
        except Exception as exc:
            log.warning("max-deliveries advisory for %s not handled: %s", self.kind, exc)
            return
        data = stored.data or b""
        try:
            envelope = decode(TaskEnvelope, data)
            task_id = envelope.id
        except MessageValidationError:
            task_id = f"invalid-{seq}"
        reason = ErrorBody(
            code="exhausted",
            message=f"no worker acknowledged it in {deliveries} deliveries (worker crashed or timed out)",
        )
        await dead_letter(self.bus, self.store, task_id, self.kind, reason, deliveries, data, TaskStatus.DEAD)
        try:
            await self.bus.js.delete_msg(self.bus.subjects.task_stream, seq)
        except Exception:
            pass


async def replay_dead_letter(bus: Bus, store: TaskStore, letter: DeadLetter) -> str:
    """Run a dead-lettered task again under its own id (after a fix)."""
    envelope = decode(TaskEnvelope, letter.envelope.encode())

    def reset(record: TaskRecord | None) -> TaskRecord:
        base = record or TaskRecord(id=envelope.id, kind=envelope.kind, status=TaskStatus.PENDING)
        return base.model_copy(
            update={"status": TaskStatus.PENDING, "attempts": 0, "error": None, "result": None, "message_seq": None}
        )

    await store.transition(envelope.id, reset, kind=envelope.kind)
    headers = tracing.inject({MSG_ID_HEADER: replay_message_id(envelope.id), TASK_ID_HEADER: envelope.id})
    await bus.js.publish(bus.subjects.task(envelope.kind), letter.envelope.encode(), headers=headers)
    return envelope.id
