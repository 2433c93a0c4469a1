"""The DSPy part: the RoleRefiner program on the offline demo engine, its bundled demos, an LM answer that
cannot be parsed, and optimizing the program like any other (registered by name, LabeledFewShot, its metric)."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.lm15 import Message, Request, Response, Usage

from dspyrt.agents.lm import demo_lm
from dspyrt.agents.optimizers.models import OptimizationRequest
from dspyrt.agents.programs import (
    ENTRY_POINT_GROUP,
    ProgramRegistry,
    ProgramSpec,
    build_program,
    dump_program_state,
    load_program_state,
)
from dspyrt.agents.roles import (
    BUNDLED_DEMOS,
    Proposal,
    RoleDefinition,
    RoleRefinementSystem,
    RoleRefiner,
    check_role,
    example_row,
    patterns_in,
    role_refinement_metric,
)
from dspyrt.agents.roles.program import INPUT_FIELDS, OUTPUT_FIELDS, refiner_inputs

pytestmark = pytest.mark.timeout(30)

GUIDE_ROLE = RoleDefinition.model_validate(
    {
        "role_type": "planner",
        "focus": "business strategy and stakeholder management",
        "context": "enterprise system overview",
        "responsibilities": ["stakeholder_analysis", "business_priority_assessment"],
    }
)


def test_the_guides_role_on_the_demo_engine_gets_the_demos_rewrites() -> None:
    result = RoleRefinementSystem().refine(GUIDE_ROLE, lm=demo_lm())
    assert result.after.responsibilities == ["user_needs_analysis", "feature_prioritization"]
    assert {c.kind for c in result.changes} == {"rewritten", "focus", "context"}
    assert all(c.source == "lm" for c in result.changes)
    assert result.score == result.lm_score == 1.0 and result.after.corporate_patterns_removed


@pytest.mark.parametrize("row", BUNDLED_DEMOS, ids=lambda row: str(row["role"]))
def test_every_bundled_demo_follows_the_rules_it_teaches(row: dict[str, Any]) -> None:
    role = RoleDefinition.model_validate(
        {"role_type": row["role"], "focus": row["focus"], "context": row["context"],
         "responsibilities": row["responsibilities"], "keep": row["keep"]}
        if row["role"] != "release-manager"
        else {"role_type": "custom", "custom_name": row["role"], "focus": row["focus"], "context": row["context"],
              "responsibilities": row["responsibilities"], "keep": row["keep"]}
    )  # fmt: skip
    assert check_role(role), "a demo without corporate patterns teaches nothing"
    assert row == {**row, **refiner_inputs(role, row["target_context"])}  # inputs are what the system sends
    for text in [row["refined_focus"], row["refined_context"], *row["refined_responsibilities"]]:
        assert patterns_in(text) == [], text
    assert set(row["rewrites"]) <= set(row["responsibilities"])
    proposal = Proposal.from_outputs(
        row["refined_focus"], row["refined_context"], row["refined_responsibilities"], row["rewrites"]
    )
    result = RoleRefinementSystem.apply(role, proposal, row["target_context"], lm_used=True)
    assert result.lm_score == result.score == 1.0
    assert not [c for c in result.changes if c.kind in ("restored", "rejected")]


def test_without_demos_the_demo_engine_answers_unknown_and_the_checks_still_hold() -> None:
    system = RoleRefinementSystem(program=RoleRefiner(demos=[]))
    result = system.refine(GUIDE_ROLE, lm=demo_lm())
    assert result.lm_used and result.lm_score == 0.0
    assert result.findings_after == [] and result.after.responsibilities == ["planner_work_for_a_solo_developer"]


class Unparseable:
    """An LM engine that ignores the output format."""

    def __init__(self) -> None:
        self.calls = 0

    def complete(self, request: Request) -> Response:
        self.calls += 1
        return Response(
            id="x", model=request.model, message=Message.assistant("I will not use your format."),
            finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1),
        )  # fmt: skip

    def stream(self, request: Request) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        return None


def test_an_unparseable_answer_leaves_the_checks_to_decide_with_a_warning() -> None:
    engine = Unparseable()
    lm = dspy.LM("local/unparseable", engine=engine, cache=False, num_retries=0)
    role = RoleDefinition.model_validate(
        {"role_type": "coder", "focus": "code", "responsibilities": ["write_code", "sign_off_on_merges"]}
    )
    result = RoleRefinementSystem().refine(role, lm=lm)
    assert engine.calls >= 1 and result.after.responsibilities == ["write_code"]
    assert result.warnings and "could not be parsed" in result.warnings[0]


def registry() -> ProgramRegistry:
    entry = EntryPoint(name="role_refiner", value="dspyrt.agents.roles.program:RoleRefiner", group=ENTRY_POINT_GROUP)
    return ProgramRegistry([entry])


def test_registered_by_name_it_builds_with_its_demos_and_its_state_round_trips() -> None:
    spec = ProgramSpec(registered="role_refiner")
    program = build_program(spec, registry=registry())
    assert isinstance(program, RoleRefiner) and len(program.refine.demos) == len(BUNDLED_DEMOS)
    state = dump_program_state(program)
    restored = load_program_state(spec, state, registry=registry())
    assert dump_program_state(restored) == state


# Roles the bundled demos do not cover well, with the refinement wanted for each.
TRAIN = [
    example_row(
        {"role_type": "researcher", "focus": "vendor evaluation for the procurement board",
         "context": "enterprise architecture office",
         "responsibilities": ["benchmark_libraries", "vendor_sign_off_packages", "legal_review_coordination"]},
        "solo developer",
        refined_focus="choosing libraries and services for the project",
        refined_context="one developer picking dependencies",
        refined_responsibilities=["benchmark_libraries", "license_check"],
        rewrites={"legal_review_coordination": "license_check"},
        rationale="Sign-off packages go; the legal review becomes a license check.",
    ),
    example_row(
        {"role_type": "reviewer", "focus": "security governance reviews",
         "context": "enterprise security office with risk committees",
         "responsibilities": ["threat_modelling", "risk_committee_briefings", "dependency_audit"]},
        "solo developer",
        refined_focus="keeping the project secure",
        refined_context="one developer owning security",
        refined_responsibilities=["threat_modelling", "dependency_audit", "security_notes"],
        rewrites={"risk_committee_briefings": "security_notes"},
        rationale="Briefings become notes.",
    ),
]  # fmt: skip
VAL = [
    example_row(
        {"role_type": "researcher", "focus": "vendor evaluation for the architecture board",
         "context": "enterprise architecture office",
         "responsibilities": ["benchmark_libraries", "vendor_sign_off_packages", "legal_review_coordination",
                              "prototype_spikes"]},
        "solo developer",
        refined_focus="choosing libraries for the project",
        refined_context="one developer picking dependencies",
        refined_responsibilities=["benchmark_libraries", "license_check", "prototype_spikes"],
        rewrites={"legal_review_coordination": "license_check"},
        rationale="",
    ),
    example_row(
        {"role_type": "reviewer", "focus": "security governance reviews and risk committees",
         "context": "enterprise security office",
         "responsibilities": ["threat_modelling", "risk_committee_briefings", "dependency_audit"]},
        "solo developer",
        refined_focus="keeping the project secure",
        refined_context="one developer owning security",
        refined_responsibilities=["threat_modelling", "dependency_audit", "security_notes"],
        rewrites={"risk_committee_briefings": "security_notes"},
        rationale="",
    ),
]  # fmt: skip


def test_labeled_fewshot_optimizes_it_on_its_metric() -> None:
    trainset = [dspy.Example(**row).with_inputs(*INPUT_FIELDS) for row in TRAIN]
    valset = [dspy.Example(**row).with_inputs(*INPUT_FIELDS) for row in VAL]
    metric = role_refinement_metric()
    student = build_program(ProgramSpec(registered="role_refiner"), registry=registry())

    def score(program: Any) -> float:
        evaluate = dspy.Evaluate(devset=valset, metric=metric, num_threads=1, display_progress=False)
        return float(evaluate(program).score)

    with dspy.context(lm=demo_lm()):
        baseline = score(student)
        optimized = dspy.LabeledFewShot(k=16).compile(student, trainset=[*trainset, *student.refine.demos])
        after = score(optimized)
    assert len(optimized.refine.demos) == len(TRAIN) + len(BUNDLED_DEMOS)
    assert after > baseline


def test_the_example_optimize_task_is_a_valid_request_with_complete_rows() -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "roles" / "optimize-refiner.json"
    task = json.loads(path.read_text())
    request = OptimizationRequest.model_validate(task["input"])
    assert task["kind"] == "optimize" and request.program.registered == "role_refiner"
    assert request.metric == "role_refinement"
    for row in [*request.trainset, *(request.valset or [])]:
        assert set(row) == {*INPUT_FIELDS, *OUTPUT_FIELDS}
