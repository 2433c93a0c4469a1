"""The audit trail: every submitted task, deploy and rollback, with who, what and when, in ``DSPY_AUDIT``.

"Who" is the NATS user the record was published as and the identity the client declared. The user is read from
the record's subject (``<prefix>.audit.<user>.<action>``), not its body: under the deploy's permissions each user
may publish only under its own token, so the server vouches for it. The stream denies deletes and purges.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from dspyrt.bus.connection import Bus
from dspyrt.bus.streams import read_tail


class AuditRecord(BaseModel):
    action: str  # task.submit, deploy, rollback, promote, ...
    target: str  # what it acted on: a task id, a program
    nats_user: str | None = None  # from the subject (see the module docstring)
    identity: str | None = None
    time: float = Field(default_factory=time.time)
    detail: dict[str, Any] = Field(default_factory=dict)


async def record_audit(
    bus: Bus, action: str, target: str, *, identity: str | None = None, detail: dict[str, Any] | None = None
) -> None:
    """Append one record. A JetStream publish: it is stored (acknowledged) before this returns."""
    user = bus.options.user
    record = AuditRecord(action=action, target=target, nats_user=user, identity=identity, detail=detail or {})
    await bus.js.publish(bus.subjects.audit(action, user), record.model_dump_json().encode())


async def read_audit(bus: Bus, limit: int = 100) -> list[AuditRecord]:
    """The newest ``limit`` records, oldest first."""
    tail = await read_tail(bus, bus.subjects.audit_stream, limit)
    return [
        AuditRecord.model_validate_json(data).model_copy(update={"nats_user": bus.subjects.audit_user(subject)})
        for _, subject, data in tail
    ]
