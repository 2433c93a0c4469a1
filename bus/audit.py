"""The audit trail: every submitted task, deploy and rollback, with who, what and when, in ``DSPY_AUDIT``.

"Who" is the NATS user the record was published as and the identity the client declared. The user is read from
the record's subject (``<prefix>.audit.<user>.<action>``), not its body: under the deploy's permissions each user
may publish only under its own token, so the server vouches for it. The stream denies deletes and purges.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import anyio
import pydantic_core
from pydantic import BaseModel, Field, TypeAdapter

from dspyrt.bus.connection import Bus
from dspyrt.bus.messages import clip
from dspyrt.bus.streams import read_tail

# A stored audit message holds one record (a JSON object) or several appended together (a JSON array of them).
# Bytes of records one message carries at most (well under any server's max_payload).
BATCH_BYTES = 64 * 1024


class AuditRecord(BaseModel):
    action: str  # task.submit, deploy, rollback, promote, ...
    target: str  # what it acted on: a task id, a program
    nats_user: str | None = None  # from the subject (see the module docstring)
    identity: str | None = None
    time: float = Field(default_factory=time.time)
    detail: dict[str, Any] = Field(default_factory=dict)


_RECORDS = TypeAdapter(list[AuditRecord])


@dataclass
class _Pending:
    data: bytes  # the record's JSON
    stored: bool = False
    error: BaseException | None = None


@dataclass
class _ActionLog:
    """One action's records waiting to be appended, and the lock held while an append is in flight."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: list[_Pending] = field(default_factory=list)


class AuditLog:
    """Appends a connection's audit records with group commit: the records that arrive while an append is in
    flight are stored together in the next one, so a burst of submissions costs a few round trips, not one each.
    Every caller still returns only once its own record is stored (or raises why it was not).

    The caller that finds no append in flight sends one (no background task); the others wait for it."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.appends = 0  # stored messages sent (each holds one or more records)
        self._actions: dict[str, _ActionLog] = {}

    async def append(self, record: AuditRecord) -> None:
        log = self._actions.setdefault(record.action, _ActionLog())
        mine = _Pending(record.model_dump_json().encode())
        log.waiting.append(mine)
        async with log.lock:
            if not mine.stored and mine.error is None:
                batch = self._take(log.waiting)
                try:
                    # Shielded: a caller cancelled now would leave the others' records unsent, or, had the
                    # server stored them already, make the next append store them twice.
                    with anyio.CancelScope(shield=True):
                        await self._store(record.action, batch)
                except Exception as exc:
                    for pending in batch:
                        pending.error = exc
                else:
                    for pending in batch:
                        pending.stored = True
        if mine.error is not None:
            raise mine.error

    @staticmethod
    def _take(waiting: list[_Pending]) -> list[_Pending]:
        size, count = 0, 0
        for pending in waiting:
            size += len(pending.data) + 1
            if count and size > BATCH_BYTES:
                break
            count += 1
        batch = waiting[:count]
        del waiting[:count]
        return batch

    async def _store(self, action: str, batch: list[_Pending]) -> None:
        body = batch[0].data if len(batch) == 1 else b"[" + b",".join(p.data for p in batch) + b"]"
        await self.bus.js.publish(self.bus.subjects.audit(action, self.bus.options.user), body)
        self.appends += 1


# One log per connection, so that every submission a process makes through it can share an append.
_logs: weakref.WeakKeyDictionary[Bus, AuditLog] = weakref.WeakKeyDictionary()


def audit_log(bus: Bus) -> AuditLog:
    """The connection's audit log (made on first use)."""
    log = _logs.get(bus)
    if log is None:
        log = _logs[bus] = AuditLog(bus)
    return log


async def record_audit(
    bus: Bus, action: str, target: str, *, identity: str | None = None, detail: dict[str, Any] | None = None
) -> None:
    """Append one record. It is stored (acknowledged by JetStream) before this returns; records other callers
    append meanwhile may share its message (see :class:`AuditLog`)."""
    user = bus.options.user
    record = AuditRecord(action=action, target=target, nats_user=user, identity=identity, detail=detail or {})
    await audit_log(bus).append(record)


def parse_audit_message(subject_user: str | None, data: bytes) -> list[AuditRecord]:
    """The records one stored audit message holds, each with the user its subject names."""
    parsed = pydantic_core.from_json(data)
    records = _RECORDS.validate_python(parsed) if isinstance(parsed, list) else [AuditRecord.model_validate(parsed)]
    return [r.model_copy(update={"nats_user": subject_user}) for r in records]


async def read_audit(bus: Bus, limit: int = 100) -> list[AuditRecord]:
    """The newest ``limit`` records, oldest first."""
    tail = await read_tail(bus, bus.subjects.audit_stream, limit)
    records: list[AuditRecord] = []
    for seq, subject, data in tail:
        user = bus.subjects.audit_user(subject)
        try:
            records.extend(parse_audit_message(user, data))
        except ValueError as exc:
            # Every user may append under its own name: a message that holds no records is shown as such, with
            # who wrote it, instead of making the whole trail unreadable.
            error = {"error": clip(f"{type(exc).__name__}: {exc}")}
            records.append(
                AuditRecord(action="unreadable", target=f"message {seq}", nats_user=user, time=0.0, detail=error)
            )
    return records[-limit:]
