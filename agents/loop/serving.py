"""Serving deployed programs: ``<prefix>.serving.predict`` runs a program's active version (or its canary, for
the canary's share of the traffic) on the model the switcher picks, with every LM call through the switcher.

Programs are loaded from their artifacts once per version and kept; a rollback or a new deploy changes the
pointer, and the next request runs the version it names. A request's inputs are checked against the version's
input fields first: a missing or unknown field is refused (``invalid_message``, with the fields it expects)
before any LM call, since DSPy would only log a warning and answer anyway.

Production feedback (:mod:`dspyrt.agents.loop.feedback`): ``record`` sets the share of a program's predictions that are
recorded (off by default); a recorded call's reply carries its ``prediction_id``; ``predictions`` lists a program's
newest records; ``feedback`` takes corrections of recorded predictions and stores them as a new version of the
program's feedback dataset (event ``feedback.recorded``, per program version in the batch).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from dspyrt.agents.artifacts import ArtifactStore
from dspyrt.agents.deployments import DeployedVersion, DeployRegistry
from dspyrt.agents.lm.bus_engine import Routing, bus_lm, program_context
from dspyrt.agents.loop.feedback import FeedbackStore, new_prediction_id
from dspyrt.agents.loop.feedback_models import (
    FeedbackReply,
    FeedbackRequest,
    PredictionList,
    PredictionsRequest,
    RecordedPrediction,
    RecordRequest,
    RecordSettings,
)
from dspyrt.agents.loop.models import FeedbackRecorded, PredictReply, PredictRequest, PredictServed
from dspyrt.agents.optimizers.core import ProgramInputs, program_inputs
from dspyrt.agents.optimizers.models import ArtifactRef
from dspyrt.agents.programs import load_program_state, parse_program_spec
from dspyrt.agents.scoring import jsonable
from dspyrt.agents.switcher.client import ask_switcher
from dspyrt.agents.switcher.models import SelectRequest
from dspyrt.bus import MessageValidationError, NotFoundError
from dspyrt.bus.tracing import current_trace_id
from dspyrt.runtime.agent import Agent, CheckResult, endpoint
from dspyrt.runtime.config import IntegrationMode

# Room left in a ``predictions`` reply for everything but the records.
_REPLY_MARGIN = 16 * 1024


class ServingAgent(Agent):
    name = "serving"
    group = "loop"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.OPTIMIZATION_ONLY})
    description = "runs deployed programs: predict; records sampled predictions and takes feedback on them"
    publishes = (PredictServed, FeedbackRecorded)

    registry: DeployRegistry
    artifacts: ArtifactStore
    feedback_store: FeedbackStore

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.registry = await DeployRegistry.open(self.bus, self.config.stream_layout)
        self.artifacts = await ArtifactStore.open(self.bus, self.config.stream_layout)
        self.feedback_store = await FeedbackStore.open(self.bus, self.config.stream_layout)
        self._programs: dict[tuple[str, int], tuple[Any, ProgramInputs]] = {}
        self._random = random.Random()
        yield

    async def _program(self, deployed: DeployedVersion, inputs: dict[str, Any]) -> Any:
        """The version's program, once ``inputs`` are checked against what it takes (before any LM call: a
        misnamed field would otherwise be answered, from nothing)."""
        key = (deployed.program, deployed.version)
        if key not in self._programs:
            document = await self.artifacts.get(
                ArtifactRef(store=deployed.artifact_store, name=deployed.artifact_name, version=str(deployed.version),
                            sha256=deployed.artifact_sha256, size=0)
            )  # fmt: skip
            program = load_program_state(parse_program_spec(document["spec"]), document["state"])
            self._programs[key] = program, program_inputs(program)
        program, takes = self._programs[key]
        takes.check(inputs, f"program {deployed.program} v{deployed.version}")
        return program

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
        """Run the program's active version (or canary) on ``inputs``: its input fields, each one it requires and
        none it does not take (else ``invalid_message`` naming the fields it expects, before any LM call)."""
        deployed, canary = await self._version(request)
        program = await self._program(deployed, request.inputs)
        selection = await ask_switcher(self.client, SelectRequest(task_kind="predict", program=request.program))
        # The version deployed for the chosen model wins, unless a version was asked for or this is the canary.
        if request.version is None and not canary and selection.deployed is not None:
            chosen = DeployedVersion.model_validate(selection.deployed)
            if chosen.version != deployed.version:
                deployed, program = chosen, await self._program(chosen, request.inputs)
        lm = bus_lm(self.client, Routing(model=selection.model, task_kind="predict"))

        def run() -> Any:
            with program_context(lm):
                return program(**request.inputs)

        try:
            prediction = await anyio.to_thread.run_sync(run)
        except (TypeError, ValueError) as exc:
            raise MessageValidationError(f"inputs do not fit program {request.program}: {exc}") from exc
        outputs = {k: jsonable(v) for k, v in prediction.items()}
        prediction_id = await self._record(request, deployed.version, selection.model, outputs, canary)
        served = PredictServed(program=request.program, version=deployed.version, canary=canary, model=selection.model)
        await self.publish_event(PredictServed.topic, served)
        return PredictReply(
            program=request.program, version=deployed.version, model=selection.model, outputs=outputs, canary=canary,
            prediction_id=prediction_id,
        )  # fmt: skip

    async def _record(
        self, request: PredictRequest, version: int, model: str, outputs: dict[str, Any], canary: bool
    ) -> str | None:
        """Record the call if it is sampled; its prediction id, or ``None`` (never raises)."""
        rate = await self.feedback_store.sample_rate(request.program)
        if rate <= 0 or self._random.random() >= rate:
            return None
        recorded = RecordedPrediction(
            prediction_id=new_prediction_id(), program=request.program, version=version, model=model,
            inputs=request.inputs, outputs=outputs, trace_id=current_trace_id(), canary=canary,
        )  # fmt: skip
        return recorded.prediction_id if await self.feedback_store.record(recorded) else None

    @endpoint("record")
    async def record(self, request: RecordRequest) -> RecordSettings:
        """Record this share (0 to 1) of the program's predictions; 0 turns recording off."""
        return await self.feedback_store.set_sample_rate(request.program, request.sample_rate)

    @endpoint("predictions")
    async def predictions(self, request: PredictionsRequest) -> PredictionList:
        """The program's newest recorded predictions (newest first), with the program's sample rate."""
        settings = await self.feedback_store.settings(request.program)
        found, truncated = await self.feedback_store.newest(
            request.program, request.limit, self.bus.max_payload - _REPLY_MARGIN
        )
        return PredictionList(
            program=request.program, sample_rate=settings.sample_rate, predictions=found, truncated=truncated
        )

    @endpoint("feedback")
    async def feedback(self, request: FeedbackRequest) -> FeedbackReply:
        """Corrections of recorded predictions: a new version of the program's feedback dataset."""
        reply = await self.feedback_store.apply(request)
        for tally in reply.versions:
            await self.publish_event(
                FeedbackRecorded.topic,
                FeedbackRecorded(program=reply.program, version=tally.version, count=tally.count, agreed=tally.agreed,
                                 dataset=reply.dataset),
            )  # fmt: skip
        return reply

    async def health_checks(self) -> dict[str, CheckResult]:
        counts = self.feedback_store.counts
        detail = f"{counts.recorded} predictions recorded, {counts.failed} failed, {counts.too_large} too large"
        return {"recording": CheckResult(ok=True, detail=detail)}
