"""Versioned refined roles in a KV bucket, so other agents can fetch them by name.

KV bucket ``<PREFIX>_roles``:

- ``<name>.v.<n>``      version n (immutable): the :class:`RoleRefinementResult` that made it (``after`` is the role)
- ``<name>``            the pointer to the latest version, with a summary for listings
- ``_task.<task_id>``   which version a durable ``refine-role`` task stored, so a redelivered task stores nothing new

A version number is claimed by creating its key (the server refuses a second create), so replicas never hand out
the same number; the pointer only moves forward, by compare-and-swap.
"""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from dspyrt.agents.roles.models import RolePointer, RoleRefinementResult
from dspyrt.bus import Bus, DspyrtError, NotFoundError, StreamLayout
from dspyrt.bus.streams import key_value, kv_keys, kv_update

BUCKET = "roles"
_ATTEMPTS = 50


def version_key(name: str, version: int) -> str:
    return f"{name}.v.{version}"


def task_key(task_id: str) -> str:
    return f"_task.{task_id}"


class RoleStore:
    """Reads and writes role versions and pointers."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus, layout: StreamLayout | None = None) -> RoleStore:
        return cls(await key_value(bus, bus.subjects.bucket(BUCKET), layout, history=8))

    async def _raw(self, key: str) -> tuple[bytes | None, int]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:  # KeyDeletedError is one too
            return None, 0
        return entry.value, int(entry.revision or 0)

    async def _keys(self) -> list[str]:
        # nats-py's keys(filters=...) matches substrings, not subject wildcards: filter here instead.
        return await kv_keys(self.kv)

    # --- reading -------------------------------------------------------------------------------------

    async def pointer(self, name: str) -> RolePointer | None:
        raw, _ = await self._raw(name)
        return RolePointer.model_validate_json(raw) if raw else None

    async def get(self, name: str, version: int | None = None) -> RoleRefinementResult:
        """Version ``version`` of the role, or its latest."""
        if version is None:
            pointer = await self.pointer(name)
            if pointer is None:
                raise NotFoundError(f"no role named {name!r}")
            version = pointer.latest
        raw, _ = await self._raw(version_key(name, version))
        if not raw:
            raise NotFoundError(f"role {name!r} has no version {version}")
        return RoleRefinementResult.model_validate_json(raw)

    async def versions(self, name: str) -> list[int]:
        prefix = f"{name}.v."
        return sorted(
            int(k[len(prefix) :]) for k in await self._keys() if k.startswith(prefix) and k[len(prefix) :].isdigit()
        )

    async def pointers(self) -> list[RolePointer]:
        """Every role's pointer, by name."""
        names = sorted(k for k in await self._keys() if "." not in k)
        found = [await self.pointer(name) for name in names]
        return [p for p in found if p is not None]

    # --- writing -------------------------------------------------------------------------------------

    async def save(self, result: RoleRefinementResult, *, task_id: str | None = None) -> RoleRefinementResult:
        """Store ``result`` as the role's next version and point to it; the stored copy (with its version).

        With ``task_id``, a second save for the same task returns the version the first one stored.
        """
        if task_id is not None:
            raw, _ = await self._raw(task_key(task_id))
            if raw:
                name, _, number = raw.decode().rpartition(":")
                return await self.get(name, int(number))
        name = result.name
        pointer = await self.pointer(name)
        version = (pointer.latest if pointer else 0) + 1
        for _ in range(_ATTEMPTS):
            wanted = result.model_copy(update={"version": version, "task_id": task_id})
            holder = await self._claim(wanted)
            if holder is wanted or (task_id is not None and holder.task_id == task_id):
                # Ours; or an earlier delivery of this task stored it and stopped before the rest: finish its save.
                stored = holder
                break
            version += 1  # another replica took this number
        else:
            raise DspyrtError(f"could not allocate a version of role {name}: too much contention", code="conflict")
        if task_id is not None:
            await self.kv.put(task_key(task_id), f"{name}:{version}".encode())
        await self._advance(stored)
        return stored

    async def _claim(self, wanted: RoleRefinementResult) -> RoleRefinementResult:
        """Store ``wanted`` under its version number unless that number is taken: ``wanted`` itself when this call
        stored it, else the version that holds the number."""
        data = wanted.model_dump_json().encode()
        key = version_key(wanted.name, wanted.version or 0)
        claim = await kv_update(self.kv, key, lambda raw: None if raw else data)
        if claim.written:
            return wanted
        # Not written only when the number is taken: the stored value is the version that holds it.
        return RoleRefinementResult.model_validate_json(claim.value or b"")

    async def _advance(self, stored: RoleRefinementResult) -> None:
        """Move the pointer to ``stored`` unless it already points to a later version."""
        version = stored.version or 0
        new = RolePointer(
            name=stored.name,
            latest=version,
            role_type=stored.after.label,
            target_context=stored.target_context,
            score=stored.score,
        ).model_dump_json().encode()

        def advance(raw: bytes | None) -> bytes | None:
            return None if raw and RolePointer.model_validate_json(raw).latest >= version else new

        await kv_update(self.kv, stored.name, advance, attempts=_ATTEMPTS)
