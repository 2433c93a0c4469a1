"""Program artifacts: the optimizer's ``dump_state()`` documents in the object store, checked by sha256."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import ObjectStore

from dspyrt.agents.optimizers.models import ArtifactRef
from dspyrt.bus import Bus, DspyrtError, NotFoundError, StreamLayout
from dspyrt.bus.streams import object_store

ARTIFACT_FORMAT = "dspyrt.program/1"
STORE_NAME = "artifacts"


class ArtifactStore:
    """Put and get program documents (``{"format", "spec", "state", ...}``) by name."""

    def __init__(self, store: ObjectStore, name: str) -> None:
        self.store = store
        self.name = name

    @classmethod
    async def open(cls, bus: Bus, layout: StreamLayout | None = None) -> ArtifactStore:
        name = bus.subjects.object_store(STORE_NAME)
        return cls(await object_store(bus, name, layout), name)

    async def put(self, name: str, document: dict[str, Any]) -> ArtifactRef:
        data = json.dumps({"format": ARTIFACT_FORMAT, **document}, sort_keys=True).encode()
        await self.store.put(name, data)
        return ArtifactRef(
            store=self.name, name=name, version=name.rsplit("/", 1)[-1].removesuffix(".json"),
            sha256=hashlib.sha256(data).hexdigest(), size=len(data),
        )  # fmt: skip

    async def get(self, ref: ArtifactRef) -> dict[str, Any]:
        if ref.store != self.name:
            raise NotFoundError(f"artifact store {ref.store} is not this deployment's ({self.name})")
        try:
            result = await self.store.get(ref.name)
        except ObjectNotFoundError as exc:  # missing or deleted; anything else (a timeout) is not "not found"
            raise NotFoundError(f"artifact {ref.name} not found in {ref.store}") from exc
        data = result.data or b""
        if ref.sha256 and hashlib.sha256(data).hexdigest() != ref.sha256:
            raise DspyrtError(f"artifact {ref.name} does not match its sha256", code="corrupt_artifact")
        document: dict[str, Any] = json.loads(data)
        if document.get("format") != ARTIFACT_FORMAT:
            raise DspyrtError(f"artifact {ref.name} is not a {ARTIFACT_FORMAT} document", code="corrupt_artifact")
        return document
