"""The roles agent: ``RoleRefinementSystem`` on the bus, and the versioned roles other agents fetch.

Endpoints (``<prefix>.roles.<name>``):

- ``refine``  {role, target_context?, model?, use_lm?, save?, max_lm_calls?} → ``RoleRefinementResult``
- ``check``   {role} → the corporate patterns in it (deterministic, no LM)
- ``get``     {name, version?} → ``RoleRecord`` (the latest version unless one is named)
- ``list``    {} → every role's pointer (latest version, score)

Durable task ``refine-role`` takes the same input as ``refine`` (use it when the LM is slow or costs money); a
redelivered task returns the version its first delivery stored. Every LM call goes through the switcher
(task kind ``refine-role``), so the models tagged ``refine-role`` are preferred for it.

A stored role is used by name: an agent playing the role fetches it with ``get`` and passes ``role=<name>`` to
the switcher (``SelectRequest.role`` / ``CompletionRequest.role`` / ``Routing(role=...)``), which then prefers
models tagged with that name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio

from dspyrt.agents.lm.bus_engine import Routing, UsageMeter, bus_lm
from dspyrt.agents.roles.core import RoleRefinementSystem
from dspyrt.agents.roles.models import (
    REFINE_TASK,
    CheckReply,
    CheckRequest,
    GetRole,
    RefineRequest,
    RoleList,
    RoleRecord,
    RoleRefined,
    RoleRefinementResult,
)
from dspyrt.agents.roles.patterns import CORPORATE_PATTERNS, patterns_in
from dspyrt.agents.roles.store import RoleStore
from dspyrt.bus import Empty
from dspyrt.runtime.agent import Agent, CheckResult, TaskContext, endpoint, task
from dspyrt.runtime.config import IntegrationMode


class RolesAgent(Agent):
    """The guide's RoleRefinementSystem on the bus."""

    name = "roles"
    group = "roles"
    modes = frozenset({IntegrationMode.FULL})
    description = "role refinement: corporate-pattern checks, DSPy rewrites, versioned roles"
    publishes = (RoleRefined,)

    system: RoleRefinementSystem
    store: RoleStore

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.system = RoleRefinementSystem()
        self.store = await RoleStore.open(self.bus, self.config.stream_layout)
        yield

    # --- refinement ----------------------------------------------------------------------------------

    @endpoint("refine")
    async def refine(self, request: RefineRequest) -> RoleRefinementResult:
        """Refine a role now (one LM call through the switcher, then the deterministic checks)."""
        return await self._refine(request, task_id=None)

    @task(REFINE_TASK)
    async def refine_role(self, job: RefineRequest, ctx: TaskContext) -> RoleRefinementResult:
        await ctx.progress("refining", step=0, total=1)
        return await self._refine(job, task_id=ctx.task_id)

    async def _refine(self, request: RefineRequest, task_id: str | None) -> RoleRefinementResult:
        meter = UsageMeter(max_calls=request.max_lm_calls)
        lm = bus_lm(self.client, Routing(model=request.model, task_kind=REFINE_TASK), meter) if request.use_lm else None
        run = partial(self.system.refine, request.role, request.target_context, lm=lm)
        try:
            result = await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        finally:
            # A run abandoned by shutdown must stop spending: its next LM call fails at once.
            meter.exhausted = meter.exhausted or "refinement over"
        result.lm_calls = meter.calls
        result.model = max(meter.models, key=meter.models.__getitem__) if meter.models else None
        if request.save:
            result = await self.store.save(result, task_id=task_id)
        await self.publish_event(RoleRefined.topic, RoleRefined.of(result, task_id))
        return result

    @endpoint("check")
    async def check(self, request: CheckRequest) -> CheckReply:
        """The corporate patterns in a role (deterministic, no LM)."""
        findings = self.system.check(request.role)
        return CheckReply(
            name=request.role.name,
            clean=not findings,
            patterns=list(dict.fromkeys(f.pattern for f in findings)),
            corporate_responsibilities=[r for r in request.role.responsibilities if patterns_in(r)],
            findings=findings,
        )

    # --- stored roles --------------------------------------------------------------------------------

    @endpoint("get")
    async def get(self, request: GetRole) -> RoleRecord:
        """A stored role: its latest version, or the one named."""
        refinement = await self.store.get(request.name, request.version)
        versions = await self.store.versions(request.name)
        return RoleRecord(
            name=refinement.name,
            version=refinement.version or 0,
            latest=max(versions, default=refinement.version or 0),
            versions=versions,
            role=refinement.after,
            refinement=refinement,
        )

    @endpoint("list")
    async def list_roles(self, _: Empty) -> RoleList:
        """Every stored role with its latest version."""
        return RoleList(roles=await self.store.pointers())

    async def health_checks(self) -> dict[str, CheckResult]:
        demos = len(getattr(getattr(self.system.program, "refine", None), "demos", None) or [])
        return {"roles": CheckResult(ok=True, detail=f"{len(CORPORATE_PATTERNS)} patterns, {demos} demos")}
