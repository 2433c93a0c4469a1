"""The JetStream layout of a deployment: streams, buckets and the object store, created idempotently."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from nats.js import JetStreamContext, api
from nats.js.errors import (
    APIError,
    BadRequestError,
    BucketNotFoundError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from dspyrt.bus.connection import Bus
from dspyrt.bus.errors import DspyrtError

DAY = 24 * 3600.0
log = logging.getLogger("dspyrt.bus")


class StreamOutcome(StrEnum):
    """What ``ensure_streams`` did to one stream."""

    CREATED = "created"
    UNCHANGED = "unchanged"
    UPDATED = "updated"
    # It exists with other settings and this caller may not change them (``update=False``): left as it is.
    DIFFERS = "differs"


@dataclass(frozen=True)
class StreamLayout:
    """Sizes and retention of the deployment's streams. ``replicas`` is 3 on a 3-node cluster."""

    replicas: int = 1
    # Re-submitting a task id inside this window is dropped by the server itself.
    task_duplicate_window: float = 3600.0
    event_max_age: float = 7 * DAY
    event_max_bytes: int = 256 * 1024 * 1024
    dlq_max_age: float = 30 * DAY
    audit_max_age: float = 365 * DAY
    task_record_ttl: float = 30 * DAY


async def _ensure_stream(bus: Bus, config: api.StreamConfig, update: bool) -> StreamOutcome:
    name = config.name or ""
    try:
        await bus.js.stream_info(name)
        existed = True
    except NotFoundError:
        existed = False
    try:
        await bus.js.add_stream(config)  # idempotent when the settings are the same
    except BadRequestError as exc:
        # It exists with other settings (changed configuration, or made by an older version).
        if not update:
            log.warning(
                "stream %s exists with other settings than this process's (%s); left as it is: apply them with "
                "'dspyrt streams' as a user allowed to update streams",
                name,
                exc.description,
            )
            return StreamOutcome.DIFFERS
        await bus.js.update_stream(config)
        return StreamOutcome.UPDATED
    return StreamOutcome.UNCHANGED if existed else StreamOutcome.CREATED


async def ensure_streams(
    bus: Bus, layout: StreamLayout | None = None, *, update: bool = True
) -> dict[str, StreamOutcome]:
    """Create the task, event, dead-letter and audit streams and the task bucket where missing; bring existing
    streams to ``layout`` unless ``update`` is false (the deploy's agents may create but not change streams)."""
    layout = layout or StreamLayout()
    s = bus.subjects
    outcomes: dict[str, StreamOutcome] = {}
    outcomes[s.task_stream] = await _ensure_stream(
        bus,
        api.StreamConfig(
            name=s.task_stream,
            subjects=[s.all_tasks],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=layout.task_duplicate_window,
            num_replicas=layout.replicas,
            description="durable tasks; each is taken by one worker",
        ),
        update,
    )
    outcomes[s.event_stream] = await _ensure_stream(
        bus,
        api.StreamConfig(
            name=s.event_stream,
            subjects=[s.all_events],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=layout.event_max_age,
            max_bytes=layout.event_max_bytes,
            discard=api.DiscardPolicy.OLD,
            num_replicas=layout.replicas,
            description="fan-out events, kept so late subscribers can replay",
        ),
        update,
    )
    outcomes[s.dlq_stream] = await _ensure_stream(
        bus,
        api.StreamConfig(
            name=s.dlq_stream,
            subjects=[s.all_dlq],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=layout.dlq_max_age,
            num_replicas=layout.replicas,
            description="dead-lettered tasks with their reason and delivery count",
        ),
        update,
    )
    outcomes[s.audit_stream] = await _ensure_stream(
        bus,
        api.StreamConfig(
            name=s.audit_stream,
            subjects=[s.all_audit],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=layout.audit_max_age,
            num_replicas=layout.replicas,
            deny_delete=True,
            deny_purge=True,
            description="audit trail: who submitted, deployed or rolled back what, and when",
        ),
        update,
    )
    await key_value(bus, s.task_bucket, layout, ttl=layout.task_record_ttl)
    return outcomes


async def key_value(
    bus: Bus, bucket: str, layout: StreamLayout | None = None, *, ttl: float | None = None, history: int = 1
) -> KeyValue:
    """Open a KV bucket, creating it first if needed."""
    layout = layout or StreamLayout()
    try:
        return await bus.js.key_value(bucket)
    except BucketNotFoundError:  # anything else (a timeout, a refused permission) is not a reason to create it
        return await bus.js.create_key_value(
            bucket=bucket, history=history, ttl=ttl, replicas=layout.replicas, storage=api.StorageType.FILE
        )


async def cache_bucket(
    bus: Bus, bucket: str, layout: StreamLayout | None = None, *, ttl: float, max_bytes: int
) -> KeyValue:
    """Open a KV bucket used as a cache, creating it first if needed: entries expire after ``ttl`` seconds and,
    past ``max_bytes``, the oldest are dropped to make room (a plain KV bucket refuses new writes instead)."""
    layout = layout or StreamLayout()
    try:
        return await bus.js.key_value(bucket)
    except BucketNotFoundError:
        pass
    # nats-py's create_key_value fixes DiscardPolicy.NEW; the same stream layout with OLD, made here.
    await bus.js.add_stream(
        api.StreamConfig(
            name=f"KV_{bucket}",
            description="cache: oldest entries are dropped when full",
            subjects=[f"$KV.{bucket}.>"],
            allow_direct=True,
            allow_rollup_hdrs=True,
            deny_delete=True,
            discard=api.DiscardPolicy.OLD,
            duplicate_window=min(120.0, ttl),
            max_age=ttl,
            max_bytes=max_bytes,
            max_msgs_per_subject=1,
            num_replicas=layout.replicas,
            storage=api.StorageType.FILE,
        )
    )
    return await bus.js.key_value(bucket)


async def object_store(bus: Bus, name: str, layout: StreamLayout | None = None) -> ObjectStore:
    """Open an object store, creating it first if needed."""
    layout = layout or StreamLayout()
    try:
        return await bus.js.object_store(name)
    except BucketNotFoundError:
        return await bus.js.create_object_store(
            name, config=api.ObjectStoreConfig(replicas=layout.replicas, storage=api.StorageType.FILE)
        )


KvChange = Callable[[bytes | None], bytes | Awaitable[bytes | None] | None]
"""What :func:`kv_update` applies: the current value (``None``: none) to the new one (``None``: write nothing)."""


@dataclass(frozen=True)
class KvUpdate:
    """What :func:`kv_update` left in the key: the stored value (``None``: none), its revision (0: the key was
    never written or is deleted), and whether this call wrote it (``False``: ``change`` returned ``None``)."""

    value: bytes | None
    revision: int
    written: bool


async def kv_update(
    kv: KeyValue,
    key: str,
    change: KvChange,
    *,
    attempts: int = 20,
    known: tuple[bytes | None, int] | None = None,
) -> KvUpdate:
    """Read ``key``, apply ``change`` to its value and write the result with compare-and-swap, reading again and
    applying ``change`` again when another writer got there first: no update is lost, and none is applied to a
    value that is not the stored one. The one read-modify-write of the project's KV buckets.

    ``change`` may be a coroutine function (it may read or write elsewhere; it runs again after a lost race).
    It returns ``None`` to write nothing, or raises to refuse: the exception reaches the caller and nothing is
    written. ``known``: a value and revision the caller already holds, used for the first attempt instead of a
    read (a stale one costs one lost compare-and-swap). After ``attempts`` lost races, ``DspyrtError`` with code
    ``conflict``.
    """
    for attempt in range(attempts):
        if attempt == 0 and known is not None:
            current, revision = known
        else:
            try:
                entry = await kv.get(key)
                current, revision = entry.value or None, int(entry.revision or 0)
            except (KeyNotFoundError, KeyDeletedError):  # never written, or deleted
                current, revision = None, 0
        changed = change(current)
        new = await changed if isinstance(changed, Awaitable) else changed
        if new is None:
            return KvUpdate(current, revision, written=False)
        try:
            # create() also takes over a deleted key (its delete marker is the revision nats-py updates).
            written = await kv.create(key, new) if revision == 0 else await kv.update(key, new, last=revision)
        except KeyWrongLastSequenceError:
            continue
        return KvUpdate(new, int(written), written=True)
    raise DspyrtError(f"{key}: changed by other writers {attempts} times in a row; try again", code="conflict")


# nats-py's default object chunk; a server with a smaller max_payload gets smaller chunks (see put_object).
OBJECT_CHUNK = 128 * 1024


async def put_object(store: ObjectStore, name: str, data: Any, max_payload: int) -> None:
    """``store.put`` in chunks that fit the server's ``max_payload`` (nats-py's fixed 128 KiB chunk is refused by
    a server configured below it)."""
    chunk = max(min(OBJECT_CHUNK, max_payload - 4096), 1024)
    meta = api.ObjectMeta(name=name, options=api.ObjectMetaOptions(max_chunk_size=chunk))
    await store.put(name, data, meta=meta)


async def kv_keys(kv: KeyValue) -> list[str]:
    """Every key of a bucket; an empty bucket is ``[]`` (nats-py raises ``NoKeysError`` for it)."""
    try:
        return list(await kv.keys())
    except (NoKeysError, NotFoundError):
        return []


async def kv_keys_matching(js: JetStreamContext, bucket: str, pattern: str) -> list[str]:
    """The keys of ``bucket`` that match ``pattern`` (a key with ``*``/``>`` wildcards), sorted, from the per-subject
    counts of the bucket's stream: one JetStream API request, answered by the stream's leader, so a write it has
    acknowledged is seen. A deleted key whose delete marker is still stored is included.

    Not nats-py's ``keys(filters=...)``: nats-py 2.16 watches every key and keeps those that contain a filter as
    a plain substring (a wildcard filter matches nothing), and its watcher may report an empty listing when the
    first message is still in flight.
    """
    head = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=head + pattern)
    return sorted(subject[len(head) :] for subject in info.state.subjects or {})


@dataclass(frozen=True)
class StreamPage:
    """One page of a stream, newest last: ``messages`` as (sequence, subject, body), oldest first;
    ``next_before`` is the ``before`` that reads the page of older ones (``None``: there are none)."""

    messages: list[tuple[int, str, bytes]]
    next_before: int | None


async def read_page(bus: Bus, stream: str, limit: int, *, before: int | None = None) -> StreamPage:
    """The newest ``limit`` messages of a stream whose sequence is below ``before`` (default: all), read one by
    one from the newest down; deleted, expired and empty ones are skipped and do not count."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    info = await bus.js.stream_info(stream)
    first, last = info.state.first_seq, info.state.last_seq
    seq = last if before is None else min(last, before - 1)
    newest_first: list[tuple[int, str, bytes]] = []
    while seq >= max(first, 1) and len(newest_first) < limit:
        try:
            raw = await bus.js.get_msg(stream, seq)
        except APIError:
            raw = None  # deleted or expired (the server answers not found or bad request)
        if raw is not None and raw.data:
            newest_first.append((seq, raw.subject or "", raw.data))
        seq -= 1
    older = seq >= max(first, 1) and bool(newest_first)
    return StreamPage(messages=newest_first[::-1], next_before=newest_first[-1][0] if older else None)


async def read_tail(bus: Bus, stream: str, limit: int) -> list[tuple[int, str, bytes]]:
    """The newest ``limit`` messages of a stream as (sequence, subject, body), oldest first (see
    :func:`read_page`)."""
    return (await read_page(bus, stream, limit)).messages
