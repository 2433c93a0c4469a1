"""Claim checks: what is too large to travel in a message or a KV record is put in the object store, and the
message or record carries an :class:`ObjectRef` (store, name, size, sha256) instead.

Used for task results over the worker's inline limit and for per-example evaluation results. A reader checks the
sha256, so an object replaced by someone who may write the store is refused, not trusted.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, BinaryIO

import anyio
from nats.js import api
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore
from pydantic import BaseModel

from dspyrt.bus.connection import Bus
from dspyrt.bus.errors import DspyrtError, NotFoundError
from dspyrt.bus.streams import StreamLayout, put_object

RESULTS_STORE = "results"


def _digest_file(path: Path, digest: Any) -> int:
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return path.stat().st_size


class ObjectRef(BaseModel):
    """Where a claim-checked body is: which object store, which object, and its size and sha256."""

    store: str
    name: str
    size: int
    sha256: str


class ClaimStore:
    """Put and get claim-checked bodies in one object store (by default the deployment's ``results`` store)."""

    def __init__(self, store: ObjectStore, name: str, max_payload: int) -> None:
        self.store = store
        self.name = name
        self.max_payload = max_payload

    @classmethod
    async def open(cls, bus: Bus, layout: StreamLayout | None = None, *, store: str = RESULTS_STORE) -> ClaimStore:
        """Open (creating it if missing) the store; its objects expire with the task records they belong to."""
        layout = layout or StreamLayout()
        name = bus.subjects.object_store(store)
        try:
            handle = await bus.js.object_store(name)
        except BucketNotFoundError:
            handle = await bus.js.create_object_store(
                name,
                config=api.ObjectStoreConfig(
                    description="claim checks: task results and evaluation details too large for a message",
                    ttl=layout.task_record_ttl,
                    replicas=layout.replicas,
                    storage=api.StorageType.FILE,
                ),
            )
        return cls(handle, name, bus.max_payload)

    async def put(self, name: str, data: bytes | Path) -> ObjectRef:
        """Store ``data`` (bytes, or a file, read in chunks) as ``name``, replacing an object of that name."""
        digest = hashlib.sha256()
        if isinstance(data, Path):
            size = await anyio.to_thread.run_sync(_digest_file, data, digest)
            with data.open("rb") as source:
                await put_object(self.store, name, source, self.max_payload)
        else:
            digest.update(data)
            size = len(data)
            await put_object(self.store, name, data, self.max_payload)
        return ObjectRef(store=self.name, name=name, size=size, sha256=digest.hexdigest())

    async def get(self, ref: ObjectRef) -> bytes:
        """The body ``ref`` names, checked against its sha256."""
        if ref.store != self.name:
            raise NotFoundError(f"object store {ref.store} is not this deployment's ({self.name})")
        try:
            result = await self.store.get(ref.name)
        except ObjectNotFoundError as exc:
            raise NotFoundError(f"{ref.name} is not in {ref.store} (expired or removed)") from exc
        data = result.data or b""
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise DspyrtError(f"{ref.name} in {ref.store} does not match its sha256", code="corrupt_result")
        return data

    async def download(self, ref: ObjectRef, path: Path) -> None:
        """Like :meth:`get`, written to the file ``path`` in chunks (for bodies too large to hold) and checked
        against ``ref``'s sha256 on the way."""
        if ref.store != self.name:
            raise NotFoundError(f"object store {ref.store} is not this deployment's ({self.name})")
        with path.open("wb") as target:
            writer = _HashingWriter(target)
            try:
                await self.store.get(ref.name, writeinto=writer)
            except ObjectNotFoundError as exc:
                raise NotFoundError(f"{ref.name} is not in {ref.store} (expired or removed)") from exc
        if writer.digest.hexdigest() != ref.sha256:
            raise DspyrtError(f"{ref.name} in {ref.store} does not match its sha256", code="corrupt_result")

    async def delete(self, ref: ObjectRef) -> None:
        try:
            await self.store.delete(ref.name)
        except ObjectNotFoundError:
            pass


class _HashingWriter(io.BufferedIOBase):
    """A file that hashes what is written to it."""

    def __init__(self, target: BinaryIO) -> None:
        super().__init__()
        self.target = target
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        block = bytes(data)
        self.digest.update(block)
        return self.target.write(block)
