"""The deploy registry: versioned program deployments, the active pointer per program (and per model), canaries.

KV bucket ``<PREFIX>_deployments``:

- ``<program>.v.<n>``         version n (immutable): the artifact it runs, its score, the model it was made for
- ``<program>``               the pointer: the active version, and an optional canary with its traffic fraction
- ``<program>.model.<model>`` the version optimized for one model, which wins when the switcher picks that model
- ``<program>.latest``        the last version number handed out (compare-and-swap, so replicas never collide)

Artifacts themselves are the optimizer's ``dump_state()`` documents in the object store.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import Field

from dspyrt.bus import Bus, Message, NotFoundError, StreamLayout
from dspyrt.bus.streams import key_value, kv_keys, kv_update


class DeployedVersion(Message):
    program: str
    version: int = Field(ge=1)
    artifact_store: str
    artifact_name: str
    artifact_sha256: str = ""
    # sha256 of the optimized state's canonical JSON and of the program spec: a candidate with both equal (and
    # the same model) is this version again, and deploying it changes nothing. None: deployed before they were kept.
    state_sha256: str | None = None
    program_hash: str | None = None
    model: str | None = None
    score: float | None = None
    baseline_score: float | None = None
    cycle_id: str | None = None
    # The dataset versions ("NAME@VERSION") the cycle that made it used: a version in use is found here.
    datasets: list[str] = Field(default_factory=list)
    deployed_at: float = Field(default_factory=time.time)

    def same_program(self, state_sha256: str | None, program_hash: str, model: str | None) -> bool:
        """Whether a candidate with this state, spec and model is this version again."""
        return (
            state_sha256 is not None
            and self.state_sha256 == state_sha256
            and self.program_hash == program_hash
            and self.model == model
        )


class ProgramPointer(Message):
    program: str
    active: DeployedVersion | None = None
    canary: DeployedVersion | None = None
    canary_fraction: float | None = None
    updated_at: float = Field(default_factory=time.time)
    note: str = ""


_KV_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
# Compare-and-swap attempts before a pointer or version update gives up (``conflict``): many replicas may deploy.
_ATTEMPTS = 50


def pointer_key(program: str, model: str | None = None) -> str:
    """KV keys allow ``-/_=.`` letters and digits; a model name with anything else (``llama3.1:8b``) is encoded."""
    if not model:
        return program
    if _KV_KEY.match(model):
        return f"{program}.model.{model}"
    return f"{program}.model.={base64.urlsafe_b64encode(model.encode()).decode().rstrip('=')}"


def version_key(program: str, version: int) -> str:
    return f"{program}.v.{version}"


class DeployRegistry:
    """Reads and writes versions and pointers. Every pointer change is compare-and-swap."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus, layout: StreamLayout | None = None) -> DeployRegistry:
        return cls(await key_value(bus, bus.subjects.bucket("deployments"), layout, history=16))

    async def _raw(self, key: str) -> tuple[bytes | None, int]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, 0
        return entry.value, int(entry.revision or 0)

    # --- reading -------------------------------------------------------------------------------------

    async def pointer(self, program: str) -> ProgramPointer | None:
        raw, _ = await self._raw(pointer_key(program))
        return ProgramPointer.model_validate_json(raw) if raw else None

    async def version(self, program: str, version: int) -> DeployedVersion:
        raw, _ = await self._raw(version_key(program, version))
        if not raw:
            raise NotFoundError(f"program {program} has no version {version}")
        return DeployedVersion.model_validate_json(raw)

    async def active(self, program: str, model: str | None = None) -> DeployedVersion | None:
        """The version to run: the one deployed for ``model`` if any, else the program's active one."""
        if model is not None:
            raw, _ = await self._raw(pointer_key(program, model))
            if raw:
                return DeployedVersion.model_validate_json(raw)
        pointer = await self.pointer(program)
        return pointer.active if pointer else None

    async def _keys(self) -> list[str]:
        return await kv_keys(self.kv)

    async def programs(self) -> list[ProgramPointer]:
        names = sorted({k for k in await self._keys() if "." not in k})
        pointers = [await self.pointer(n) for n in names]
        return [p for p in pointers if p is not None]

    async def versions(self, program: str) -> list[DeployedVersion]:
        prefix = f"{program}.v."
        numbers = sorted(int(k[len(prefix) :]) for k in await self._keys() if k.startswith(prefix))
        return [await self.version(program, n) for n in numbers]

    # --- writing -------------------------------------------------------------------------------------

    async def next_version(self, program: str) -> int:
        stored = await kv_update(
            self.kv, f"{program}.latest", lambda raw: str(int(raw or b"0") + 1).encode(), attempts=_ATTEMPTS
        )
        return int(stored.value or b"0")

    async def deploy(self, deployed: DeployedVersion, *, canary_fraction: float | None = None) -> ProgramPointer:
        """Record the version and make it active (or the canary, taking ``canary_fraction`` of the traffic)."""
        await self.kv.put(version_key(deployed.program, deployed.version), deployed.model_dump_json().encode())

        def change(pointer: ProgramPointer) -> ProgramPointer:
            if canary_fraction is not None and pointer.active is not None:
                return pointer.model_copy(
                    update={"canary": deployed, "canary_fraction": canary_fraction, "note": "canary"}
                )
            return pointer.model_copy(update={"active": deployed, "canary": None, "canary_fraction": None,
                                              "note": f"deployed v{deployed.version}"})  # fmt: skip

        pointer = await self._update_pointer(deployed.program, change)
        if pointer.active is deployed or (pointer.active and pointer.active.version == deployed.version):
            await self._point_model(deployed)
        return pointer

    async def promote(self, program: str) -> ProgramPointer:
        """Make the canary the active version."""

        def change(pointer: ProgramPointer) -> ProgramPointer:
            if pointer.canary is None:
                raise NotFoundError(f"program {program} has no canary")
            return pointer.model_copy(update={"active": pointer.canary, "canary": None, "canary_fraction": None,
                                              "note": f"promoted canary v{pointer.canary.version}"})  # fmt: skip

        pointer = await self._update_pointer(program, change)
        if pointer.active is not None:
            await self._point_model(pointer.active)
        return pointer

    async def rollback(self, program: str, version: int | None = None) -> ProgramPointer:
        """Drop the canary (when there is one and no version is named), or make ``version`` (default: the one
        before the active one) active again."""
        current = await self.pointer(program)
        if current is None or current.active is None:
            raise NotFoundError(f"program {program} is not deployed")
        if version is None and current.canary is not None:
            return await self._update_pointer(
                program,
                lambda p: p.model_copy(
                    update={
                        "canary": None,
                        "canary_fraction": None,
                        "note": f"canary v{p.canary.version} rolled back" if p.canary else "canary rolled back",
                    }
                ),
            )
        if version is None:
            earlier = [v.version for v in await self.versions(program) if v.version < current.active.version]
            if not earlier:
                raise NotFoundError(f"program {program} has no version before v{current.active.version}")
            version = max(earlier)
        target = await self.version(program, version)
        previous = current.active
        pointer = await self._update_pointer(
            program,
            lambda p: p.model_copy(update={"active": target, "canary": None, "canary_fraction": None,
                                           "note": f"rolled back from v{previous.version} to v{target.version}"}),
        )  # fmt: skip
        if previous.model and previous.model != target.model:
            await self.kv.delete(pointer_key(program, previous.model))
        await self._point_model(target)
        return pointer

    async def _point_model(self, deployed: DeployedVersion) -> None:
        if deployed.model:
            await self.kv.put(pointer_key(deployed.program, deployed.model), deployed.model_dump_json().encode())

    async def _update_pointer(self, program: str, change: Callable[[ProgramPointer], ProgramPointer]) -> ProgramPointer:
        """Apply ``change`` to the pointer with compare-and-swap; an error it raises (no canary to promote)
        leaves the pointer as it is."""
        made: list[ProgramPointer] = []  # one per attempt: the last is the one written

        def apply(raw: bytes | None) -> bytes:
            current = ProgramPointer.model_validate_json(raw) if raw else ProgramPointer(program=program)
            new = change(current)
            new.updated_at = time.time()
            made.append(new)
            return new.model_dump_json().encode()

        await kv_update(self.kv, pointer_key(program), apply, attempts=_ATTEMPTS)
        return made[-1]

    # Kept for the switcher's lookup: a pointer written directly (tests, tools).
    async def point(self, deployed: DeployedVersion) -> None:
        if deployed.model:
            await self._point_model(deployed)
            return
        await self._update_pointer(deployed.program, lambda p: p.model_copy(update={"active": deployed}))
