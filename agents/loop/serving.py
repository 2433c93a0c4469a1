"""Serving deployed programs: ``<prefix>.serving.predict`` runs a program's active version (or its canary, for
the canary's share of the traffic) on the model the switcher picks, with every LM call through the switcher.

Programs are loaded from their artifacts once per version and kept; a rollback or a new deploy changes the
pointer, and the next request runs the version it names.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import dspy

from agents.artifacts import ArtifactStore
from agents.deployments import DeployedVersion, DeployRegistry
from agents.lm.bus_engine import Routing, bus_lm
from agents.loop.models import PredictReply, PredictRequest
from agents.optimizers import ArtifactRef
from agents.programs import load_program_state, parse_program_spec
from agents.scoring import jsonable
from agents.switcher_core import Selection, SelectRequest
from bus import MessageValidationError, NotFoundError
from runtime.agent import Agent, endpoint


class ServingAgent(Agent):
    name = "serving"
    group = "loop"
    description = "runs deployed programs: predict"

    registry: DeployRegistry
    artifacts: ArtifactStore

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.registry = await DeployRegistry.open(self.bus, self.config.stream_layout)
        self.artifacts = await ArtifactStore.open(self.bus, self.config.stream_layout)
        self._programs: dict[tuple[str, int], Any] = {}
        self._random = random.Random()
        yield

    async def _program(self, deployed: DeployedVersion) -> Any:
        key = (deployed.program, deployed.version)
        if key not in self._programs:
            document = await self.artifacts.get(
                ArtifactRef(store=deployed.artifact_store, name=deployed.artifact_name, version=str(deployed.version),
                            sha256=deployed.artifact_sha256, size=0)
            )  # fmt: skip
            self._programs[key] = load_program_state(parse_program_spec(document["spec"]), document["state"])
        return self._programs[key]

    async def _version(self, request: PredictRequest) -> tuple[DeployedVersion, bool]:
        if request.version is not None:
            return await self.registry.version(request.program, request.version), False
        pointer = await self.registry.pointer(request.program)
        if pointer is None or pointer.active is None:
            raise NotFoundError(f"program {request.program} is not deployed")
        if pointer.canary is not None and self._random.random() < (pointer.canary_fraction or 0.0):
            return pointer.canary, True
        return pointer.active, False

    @endpoint("predict")
    async def predict(self, request: PredictRequest) -> PredictReply:
        """Run the program's active version (or canary) on ``inputs``."""
        deployed, canary = await self._version(request)
        program = await self._program(deployed)
        selection = await self.client.request(
            "switcher", "select", SelectRequest(task_kind="predict", program=request.program), Selection
        )
        # The version deployed for the chosen model wins, unless a version was asked for or this is the canary.
        if request.version is None and not canary and selection.deployed is not None:
            chosen = DeployedVersion.model_validate(selection.deployed)
            if chosen.version != deployed.version:
                deployed, program = chosen, await self._program(chosen)
        lm = bus_lm(self.client, Routing(model=selection.model, task_kind="predict"))

        def run() -> Any:
            with dspy.context(lm=lm):
                return program(**request.inputs)

        try:
            prediction = await anyio.to_thread.run_sync(run)
        except (TypeError, ValueError) as exc:
            raise MessageValidationError(f"inputs do not fit program {request.program}: {exc}") from exc
        outputs = {k: jsonable(v) for k, v in prediction.items()}
        await self.publish_event(
            "predict.served",
            {"program": request.program, "version": deployed.version, "canary": canary, "model": selection.model},
        )
        return PredictReply(
            program=request.program, version=deployed.version, model=selection.model, outputs=outputs, canary=canary
        )
