"""The LM part of role refinement: the ``RefineRole`` signature, the ``RoleRefiner`` module and its bundled demos.

``RoleRefiner`` is an ordinary DSPy program: one ``dspy.Predict(RefineRole)`` named ``refine``. It ships with a
small set of hand-written demos (:data:`BUNDLED_DEMOS`, one or two per role type) loaded into that predictor, so
it gives useful rewrites offline on the demo engine (which answers like the nearest demo) and a real LM sees
worked examples. Registered under ``dspyrt.programs`` it is optimizable by name like any other program::

    {"kind": "optimize", "input": {"program": {"registered": "role_refiner"}, "trainset": [...],
                                   "metric": "role_refinement", ...}}

where each training row is :func:`example_row` of a role, a target context and the refined answer. Whatever the
program answers, ``dspyrt.agents.roles.core`` applies the deterministic pass afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from dspyrt.agents.lm.bus_engine import program_context
from dspyrt.agents.lm.errors import project_error
from dspyrt.agents.roles.models import DEFAULT_TARGET_CONTEXT, RoleDefinition, RoleType
from dspyrt.agents.roles.patterns import check_role
from dspyrt.agents.roles.proposal import Proposal, proposal_score

INPUT_FIELDS: tuple[str, ...] = ("role", "focus", "context", "responsibilities", "keep", "flagged", "target_context")
OUTPUT_FIELDS: tuple[str, ...] = (
    "refined_focus",
    "refined_context",
    "refined_responsibilities",
    "rewrites",
    "rationale",
)


class RefineRole(dspy.Signature):  # type: ignore[misc]
    """Rewrite an agent role for the target working context.

    Remove corporate patterns: stakeholder management, approval chains, sign-offs, steering committees and review
    boards, status reporting to management, cross-functional alignment meetings, compliance reviews, enterprise
    ceremony and business-management language. Keep every responsibility listed in `keep` and every one that still
    matters in the target context, word for word. Rewrite each flagged responsibility into what that work becomes
    in the target context, or drop it when nothing of it is left; list each rewrite in `rewrites`
    (original responsibility -> new wording). Write plain, concrete responsibilities, in the style of the input.
    """

    role: str = dspy.InputField(desc="the kind of role: planner, coder, researcher, implementer, reviewer or a name")
    focus: str = dspy.InputField(desc="what the role concentrates on")
    context: str = dspy.InputField(desc="where the role works today")
    responsibilities: list[str] = dspy.InputField(desc="the role's responsibilities today")
    keep: list[str] = dspy.InputField(desc="responsibilities that must stay as they are")
    flagged: list[str] = dspy.InputField(desc="corporate patterns a deterministic check found, and where")
    target_context: str = dspy.InputField(desc="who the role should work for, e.g. 'solo developer'")
    refined_focus: str = dspy.OutputField(desc="the focus for the target context, without corporate patterns")
    refined_context: str = dspy.OutputField(desc="the context for the target context, without corporate patterns")
    refined_responsibilities: list[str] = dspy.OutputField(desc="the complete refined list of responsibilities")
    rewrites: dict[str, str] = dspy.OutputField(desc="original responsibility -> its rewrite, for each rewritten one")
    rationale: str = dspy.OutputField(desc="one or two sentences on what changed and why")


def flag_lines(role: RoleDefinition) -> list[str]:
    """The deterministic findings as short lines for the prompt: ``where: 'match' (pattern)``."""
    lines = []
    for finding in check_role(role):
        where = f"responsibility {finding.item}" if finding.item is not None else finding.field
        lines.append(f"{where}: '{finding.match}' ({finding.pattern})")
    return list(dict.fromkeys(lines))


def refiner_inputs(role: RoleDefinition, target_context: str = DEFAULT_TARGET_CONTEXT) -> dict[str, Any]:
    """The program's inputs for ``role`` and ``target_context``."""
    return {
        "role": role.label,
        "focus": role.focus,
        "context": role.context,
        "responsibilities": list(role.responsibilities),
        "keep": list(role.keep),
        "flagged": flag_lines(role),
        "target_context": target_context,
    }


def example_row(
    role: RoleDefinition | Mapping[str, Any],
    target_context: str,
    *,
    refined_focus: str,
    refined_context: str,
    refined_responsibilities: Sequence[str],
    rewrites: Mapping[str, str],
    rationale: str,
) -> dict[str, Any]:
    """One labelled example (a training row for an ``optimize`` task, or a demo): inputs plus the wanted answer."""
    definition = role if isinstance(role, RoleDefinition) else RoleDefinition.model_validate(role)
    return {
        **refiner_inputs(definition, target_context),
        "refined_focus": refined_focus,
        "refined_context": refined_context,
        "refined_responsibilities": list(refined_responsibilities),
        "rewrites": dict(rewrites),
        "rationale": rationale,
    }


class RoleRefiner(dspy.Module):  # type: ignore[misc]
    """Proposes a refined role: one ``Predict(RefineRole)``, starting from the bundled demos.

    ``demos`` replaces the bundled ones (``[]`` for none). ``flagged`` is computed from the role when a caller
    does not pass it.
    """

    def __init__(self, demos: Sequence[Any] | None = None) -> None:
        super().__init__()
        self.refine = dspy.Predict(RefineRole)
        self.refine.demos = list(default_demos() if demos is None else demos)

    def forward(
        self,
        role: str,
        focus: str,
        context: str,
        responsibilities: list[str],
        target_context: str = DEFAULT_TARGET_CONTEXT,
        keep: list[str] | None = None,
        flagged: list[str] | None = None,
    ) -> Any:
        if flagged is None:
            flagged = flag_lines(_role_of(role, focus, context, responsibilities, keep or []))
        return self.refine(
            role=role,
            focus=focus,
            context=context,
            responsibilities=responsibilities,
            keep=keep or [],
            flagged=flagged,
            target_context=target_context,
        )


def run_refiner(program: Any, role: RoleDefinition, target_context: str, lm: Any) -> tuple[Proposal, list[str]]:
    """Run ``program`` on ``role`` with ``lm``: its proposal, and warnings.

    An answer the adapters cannot parse is an empty proposal (the deterministic pass then decides alone); errors
    of the LM call itself (the switcher failing, a spent budget) propagate.
    """
    try:
        with program_context(lm):
            prediction = program(**refiner_inputs(role, target_context))
    except AdapterParseError as exc:
        reason = " ".join(str(exc).split())[:300]
        return Proposal.empty(), [f"the LM's answer could not be parsed, so only the checks applied: {reason}"]
    except Exception as exc:
        # DSPy wraps what an LM engine raises (LMUnexpectedError); the cause is ours, with its stable code.
        ours = project_error(exc)
        if ours is None:
            raise
        raise ours from None
    return proposal_of(prediction), []


def proposal_of(prediction: Any) -> Proposal:
    """A :class:`Proposal` from the program's prediction (missing outputs are no answer)."""
    return Proposal.from_outputs(*(getattr(prediction, name, None) for name in OUTPUT_FIELDS))


def _role_of(
    role: str, focus: str, context: str, responsibilities: Sequence[str], keep: Sequence[str]
) -> RoleDefinition:
    """A :class:`RoleDefinition` from the program's inputs (for the metric and for computing ``flagged``)."""
    kinds = {t.value for t in RoleType} - {RoleType.CUSTOM.value}
    identity: dict[str, Any] = (
        {"role_type": role} if role in kinds else {"role_type": RoleType.CUSTOM, "custom_name": "role"}
    )
    return RoleDefinition.model_validate(
        {**identity, "focus": focus or "-", "context": context, "responsibilities": responsibilities, "keep": keep}
    )


class RoleRefinementMetric:
    """DSPy metric for the program: :func:`dspyrt.agents.roles.proposal.proposal_score` of the raw prediction (0..1).

    It scores what the LM proposed, before the deterministic pass repairs anything, so optimizing the program
    improves what the LM contributes.
    """

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> float:
        role = _role_of(
            str(example.role),
            str(example.focus),
            str(example.context),
            list(example.responsibilities),
            list(getattr(example, "keep", None) or []),
        )
        return proposal_score(role, proposal_of(prediction))


def role_refinement_metric(field: str | None = None) -> RoleRefinementMetric:
    """Metric factory for ``dspyrt.metrics`` (``metric: "role_refinement"``); it reads every output field."""
    return RoleRefinementMetric()


# -------------------------------------------------------------------------------------- bundled demos

SOLO = DEFAULT_TARGET_CONTEXT

_DEMO_ROWS: tuple[dict[str, Any], ...] = (
    example_row(
        {
            "role_type": "planner",
            "focus": "business strategy and stakeholder management",
            "context": "enterprise system overview",
            "responsibilities": ["stakeholder_analysis", "business_priority_assessment"],
        },
        SOLO,
        refined_focus="product direction and scope for one person building and running the system",
        refined_context="overview of the whole system as a single developer builds, ships and runs it",
        refined_responsibilities=["user_needs_analysis", "feature_prioritization"],
        rewrites={
            "stakeholder_analysis": "user_needs_analysis",
            "business_priority_assessment": "feature_prioritization",
        },
        rationale="Stakeholders become the users; business priorities become a ranked feature list one person "
        "can act on.",
    ),
    example_row(
        {
            "role_type": "planner",
            "focus": "roadmap planning with stakeholder sign-off for the product",
            "context": "enterprise program overseen by a steering committee with quarterly business reviews",
            "responsibilities": [
                "roadmap_planning",
                "stakeholder_analysis",
                "business_priority_assessment",
                "steering_committee_preparation",
                "status_reporting_to_management",
                "milestone_planning",
                "risk_assessment",
            ],
            "keep": ["roadmap_planning"],
        },
        SOLO,
        refined_focus="a lean product roadmap one developer can plan, build and ship",
        refined_context="a one-person project with short planning cycles and a public changelog",
        refined_responsibilities=[
            "roadmap_planning",
            "user_needs_analysis",
            "feature_prioritization",
            "weekly_self_review",
            "changelog_notes",
            "milestone_planning",
            "risk_assessment",
        ],
        rewrites={
            "stakeholder_analysis": "user_needs_analysis",
            "business_priority_assessment": "feature_prioritization",
            "steering_committee_preparation": "weekly_self_review",
            "status_reporting_to_management": "changelog_notes",
        },
        rationale="Committee and reporting work becomes a weekly self-review and a changelog; planning, milestones "
        "and risks stay.",
    ),
    example_row(
        {
            "role_type": "coder",
            "focus": "implementing features after approval sign-off",
            "context": "enterprise codebase governed by a change advisory board",
            "responsibilities": [
                "write_code",
                "write_unit_tests",
                "code_review_sign_off",
                "obtain_approval_for_merges",
                "cross_functional_sync_meetings",
            ],
        },
        SOLO,
        refined_focus="implementing features in small, tested increments",
        refined_context="a single codebase one developer owns, with CI as the safety net",
        refined_responsibilities=["write_code", "write_unit_tests", "self_review_before_merge", "merge_when_ci_passes"],
        rewrites={
            "code_review_sign_off": "self_review_before_merge",
            "obtain_approval_for_merges": "merge_when_ci_passes",
        },
        rationale="Sign-offs and merge approvals become a self-review and green CI; sync meetings have no one "
        "to sync with.",
    ),
    example_row(
        {
            "role_type": "researcher",
            "focus": "market research for business units and executive sponsors",
            "context": "enterprise research department reporting to leadership",
            "responsibilities": [
                "literature_review",
                "stakeholder_interviews",
                "executive_summary_preparation",
                "prototype_experiments",
            ],
        },
        SOLO,
        refined_focus="answering the technical and product questions the next build depends on",
        refined_context="research done by the developer who will use the answers",
        refined_responsibilities=["literature_review", "user_interviews", "decision_notes", "prototype_experiments"],
        rewrites={"stakeholder_interviews": "user_interviews", "executive_summary_preparation": "decision_notes"},
        rationale="Interviews go to users, summaries become short decision notes for the developer's own use.",
    ),
    example_row(
        {
            "role_type": "implementer",
            "focus": "delivering work packages through the change management process",
            "context": "enterprise delivery organisation with compliance reviews before each release",
            "responsibilities": [
                "implement_tasks",
                "deployment",
                "compliance_review_preparation",
                "status_updates_to_management",
                "handoffs_between_teams",
            ],
        },
        SOLO,
        refined_focus="turning planned tasks into shipped, working changes",
        refined_context="one developer who builds, deploys and operates the system",
        refined_responsibilities=["implement_tasks", "deployment", "security_and_license_checklist", "progress_log"],
        rewrites={
            "compliance_review_preparation": "security_and_license_checklist",
            "status_updates_to_management": "progress_log",
        },
        rationale="The compliance review shrinks to a security and license checklist; status updates become a "
        "progress log; handoffs disappear.",
    ),
    example_row(
        {
            "role_type": "reviewer",
            "focus": "quality gate approvals for the governance board",
            "context": "enterprise review board with sign-off chains",
            "responsibilities": [
                "review_pull_requests",
                "check_test_coverage",
                "approval_process_ownership",
                "architecture_review_board_participation",
            ],
        },
        SOLO,
        refined_focus="catching defects before they ship",
        refined_context="self-review of one developer's changes, helped by automated checks",
        refined_responsibilities=["review_pull_requests", "check_test_coverage", "pre_merge_checklist"],
        rewrites={"approval_process_ownership": "pre_merge_checklist"},
        rationale="Approvals become a pre-merge checklist; the architecture board has no solo equivalent.",
    ),
    example_row(
        {
            "role_type": "custom",
            "custom_name": "release-manager",
            "focus": "coordinating releases across departments",
            "context": "enterprise release train with go/no-go sign-offs",
            "responsibilities": [
                "release_planning",
                "release_notes",
                "go_no_go_meetings_with_stakeholders",
                "cross_team_release_coordination",
            ],
        },
        SOLO,
        refined_focus="shipping releases predictably",
        refined_context="releases cut and published by the developer, checked by automation",
        refined_responsibilities=["release_planning", "release_notes", "automated_release_checks"],
        rewrites={"go_no_go_meetings_with_stakeholders": "automated_release_checks"},
        rationale="The go/no-go meeting becomes automated release checks; coordination across teams is gone.",
    ),
)


def default_demos() -> list[Any]:
    """The bundled demos, as fresh ``dspy.Example`` objects (inputs marked)."""
    return [dspy.Example(**row).with_inputs(*INPUT_FIELDS) for row in BUNDLED_DEMOS]


BUNDLED_DEMOS: tuple[dict[str, Any], ...] = _DEMO_ROWS
"""The hand-written demos the program starts from (training rows in :func:`example_row` form)."""
