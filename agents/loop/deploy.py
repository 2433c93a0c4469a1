"""The deploy phase (``<prefix>.loop-deploy.*``): the objectives gate, and the registry's public face.

A candidate that meets every objective becomes the program's next version (or its canary); one that does not
is rejected with every reason. Deploying is idempotent per cycle: a coordinator that retries the deploy of a
cycle gets the version that cycle already made, never a second one. A candidate identical to the active version
(same spec, same optimized state by ``state_sha256``, same model) is not deployed again: the verdict says
``unchanged`` with that version, and nothing is written (no version, no pointer change, no audit record).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from dspyrt.agents.deployments import DeployRegistry, ProgramPointer
from dspyrt.agents.loop.gate import check_objectives
from dspyrt.agents.loop.models import (
    DeployCompleted,
    DeployRejected,
    DeployRequest,
    DeployRollback,
    DeployUnchanged,
    DeployVerdict,
    ProgramDetail,
    ProgramList,
    ProgramName,
    RollbackRequest,
)
from dspyrt.agents.programs import program_hash
from dspyrt.bus import Empty, NotFoundError
from dspyrt.bus.audit import record_audit
from dspyrt.runtime.agent import Agent, current_caller, endpoint
from dspyrt.runtime.config import IntegrationMode


class DeployAgent(Agent):
    name = "loop-deploy"
    group = "loop"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.OPTIMIZATION_ONLY})
    description = "loop phase: the deploy gate and the deploy registry (list, show, rollback, promote)"
    publishes = (DeployCompleted, DeployRejected, DeployUnchanged, DeployRollback)

    registry: DeployRegistry

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.registry = await DeployRegistry.open(self.bus, self.config.stream_layout)
        yield

    @endpoint("deploy")
    async def deploy(self, request: DeployRequest) -> DeployVerdict:
        """Check the objectives; deploy the next version if they hold, else say every reason."""
        if request.cycle_id:
            for existing in await self.registry.versions(request.program_name):
                if existing.cycle_id == request.cycle_id:
                    pointer = await self.registry.pointer(request.program_name)
                    canary = bool(pointer and pointer.canary and pointer.canary.version == existing.version)
                    return DeployVerdict(
                        deployed=True, program_name=request.program_name, version=existing.version, canary=canary
                    )
        checks, reasons = check_objectives(request)
        if reasons:
            rejected = DeployRejected(program=request.program_name, reasons=reasons, cycle_id=request.cycle_id)
            await self.publish_event(DeployRejected.topic, rejected)
            return DeployVerdict(deployed=False, program_name=request.program_name, reasons=reasons, checks=checks)
        spec_hash = program_hash(request.program)
        unchanged = await self._unchanged(request, spec_hash, checks)
        if unchanged is not None:
            return unchanged
        version = await self.registry.next_version(request.program_name)
        deployed = request.deployed_version(version, spec_hash)
        pointer = await self.registry.deploy(deployed, canary_fraction=request.canary_fraction)
        await record_audit(
            self.bus,
            "deploy",
            request.program_name,
            identity=current_caller(),
            detail={"version": version, "cycle_id": request.cycle_id, "canary": request.canary_fraction is not None},
        )
        canary = pointer.canary is not None and pointer.canary.version == version
        await self.publish_event(
            DeployCompleted.topic,
            DeployCompleted(program=request.program_name, version=version, canary=canary, score=request.optimized_score,
                            model=request.model, cycle_id=request.cycle_id),
        )  # fmt: skip
        return DeployVerdict(
            deployed=True, program_name=request.program_name, version=version, canary=canary, checks=checks
        )

    async def _unchanged(self, request: DeployRequest, spec_hash: str, checks: dict[str, bool]) -> DeployVerdict | None:
        """The verdict for a candidate that is the active version (or, asked as a canary, the canary) again: same
        spec, same optimized state, same model. Nothing is written: no version, no pointer change, no audit
        record; a ``deploy.unchanged`` event says so. ``None``: the candidate is new."""
        pointer = await self.registry.pointer(request.program_name)
        if pointer is None:
            return None
        state = request.artifact.state_sha256
        # The active version, while no canary runs (a full deploy would drop the canary: that is a change); the
        # canary, when the candidate is asked for as a canary too.
        if pointer.canary is None and pointer.active is not None:
            same, canary = pointer.active, False
        elif pointer.canary is not None and request.canary_fraction is not None:
            same, canary = pointer.canary, True
        else:
            return None
        if not same.same_program(state, spec_hash, request.model):
            return None
        note = (
            f"unchanged: already deployed as v{same.version}{' (canary)' if canary else ''}: the same program, "
            f"optimized state (sha256 {(state or '')[:12]}) and model; no new version"
        )
        await self.publish_event(
            DeployUnchanged.topic,
            DeployUnchanged(program=request.program_name, version=same.version, canary=canary,
                            cycle_id=request.cycle_id, state_sha256=state),
        )  # fmt: skip
        return DeployVerdict(
            deployed=True, unchanged=True, program_name=request.program_name, version=same.version, canary=canary,
            note=note, checks=checks,
        )  # fmt: skip

    @endpoint("list")
    async def list_programs(self, _: Empty) -> ProgramList:
        """Every deployed program with its active version (and canary)."""
        return ProgramList(programs=await self.registry.programs())

    @endpoint("show")
    async def show(self, request: ProgramName) -> ProgramDetail:
        """One program's pointer and all its versions."""
        pointer = await self.registry.pointer(request.program)
        if pointer is None:
            raise NotFoundError(f"program {request.program} is not deployed")
        return ProgramDetail(pointer=pointer, versions=await self.registry.versions(request.program))

    @endpoint("rollback")
    async def rollback(self, request: RollbackRequest) -> ProgramPointer:
        """Drop the canary, or make an earlier version active again (default: the one before)."""
        pointer = await self.registry.rollback(request.program, request.version)
        await record_audit(
            self.bus,
            "rollback",
            request.program,
            identity=current_caller(),
            detail={"requested_version": request.version, "note": pointer.note},
        )
        await self.publish_event(
            DeployRollback.topic,
            DeployRollback(program=request.program, version=pointer.active.version if pointer.active else None,
                           note=pointer.note),
        )  # fmt: skip
        return pointer

    @endpoint("promote")
    async def promote(self, request: ProgramName) -> ProgramPointer:
        """Make the canary the active version."""
        pointer = await self.registry.promote(request.program)
        await record_audit(
            self.bus, "promote", request.program, identity=current_caller(), detail={"note": pointer.note}
        )
        return pointer
