"""The deploy registry's lookup: which optimized version of a program is active (for a model, or overall).

Pointers live in the KV bucket ``<PREFIX>_deployments``: key ``<program>`` holds the program's active version,
and ``<program>.model.<model>`` a version optimized for one model, which wins when that model is chosen.
The artifacts they point to are the optimizer's ``dump_state()`` documents in the object store. The loop's
deploy phase writes pointers; the switcher reads them so callers get the optimized program for the model it
picked (the guide's "optimizer integration").
"""

from __future__ import annotations

import time

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import Field

from bus import Bus, Message, StreamLayout
from bus.streams import key_value


class DeployedVersion(Message):
    program: str
    version: int = Field(ge=1)
    artifact_store: str
    artifact_name: str
    artifact_sha256: str = ""
    model: str | None = None
    score: float | None = None
    deployed_at: float = Field(default_factory=time.time)


def pointer_key(program: str, model: str | None = None) -> str:
    return f"{program}.model.{model}" if model else program


class DeployRegistry:
    """Reads and writes active-version pointers."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus, layout: StreamLayout | None = None) -> DeployRegistry:
        return cls(await key_value(bus, bus.subjects.bucket("deployments"), layout, history=16))

    async def _get(self, key: str) -> DeployedVersion | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return DeployedVersion.model_validate_json(entry.value) if entry.value else None

    async def active(self, program: str, model: str | None = None) -> DeployedVersion | None:
        """The version to run: the one deployed for ``model`` if any, else the program's active one."""
        if model is not None:
            for_model = await self._get(pointer_key(program, model))
            if for_model is not None:
                return for_model
        return await self._get(pointer_key(program))

    async def point(self, deployed: DeployedVersion) -> None:
        await self.kv.put(pointer_key(deployed.program, deployed.model), deployed.model_dump_json().encode())
