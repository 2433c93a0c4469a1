"""The create phase: build the program from its spec, check it, and hash it (``<prefix>.loop-create.create``)."""

from __future__ import annotations

from typing import Any

from dspyrt.agents.loop.models import CreateRequest, CreateResult
from dspyrt.agents.optimizers.core import program_inputs
from dspyrt.agents.programs import ProgramSpec, build_program, program_hash
from dspyrt.runtime.agent import Agent, endpoint
from dspyrt.runtime.config import IntegrationMode


def create_program(spec: ProgramSpec) -> tuple[Any, CreateResult]:
    program = build_program(spec)
    predictors = [name for name, _ in program.named_predictors()]
    outputs: list[str] = []
    for _, predictor in program.named_predictors():
        outputs += [n for n in predictor.signature.output_fields if n not in outputs]
    return program, CreateResult(
        program_hash=program_hash(spec),
        module=type(program).__name__,
        predictors=predictors,
        input_fields=program_inputs(program).names,
        output_fields=outputs,
    )


class CreateAgent(Agent):
    name = "loop-create"
    group = "loop"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.OPTIMIZATION_ONLY})
    description = "loop phase: build, check and hash a program spec"

    @endpoint("create")
    async def create(self, request: CreateRequest) -> CreateResult:
        """Build the program (never from code: specs and registered names only) and describe it."""
        return create_program(request.program)[1]
