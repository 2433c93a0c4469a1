"""The guide's role refinement: rewrite agent roles for a target context (e.g. a solo developer) without
corporate patterns, version them, and serve them to other agents.

    from dspyrt.agents.roles import RoleDefinition, RoleRefinementSystem, RoleType

    role = RoleDefinition(role_type=RoleType.PLANNER, focus="business strategy and stakeholder management",
                          context="enterprise system overview",
                          responsibilities=["stakeholder_analysis", "business_priority_assessment"])
    result = RoleRefinementSystem().refine(role, "solo developer", lm=dspy_lm)   # lm=None: checks only

``dspyrt.agents.roles.core`` holds the models and the deterministic checks, ``dspyrt.agents.roles.program`` the DSPy
program
(``RoleRefiner``) and its bundled demos, ``dspyrt.agents.roles.store`` the versioned KV store, and
``dspyrt.agents.roles.agent`` the ``roles`` agent.
"""

from dspyrt.agents.roles.agent import (
    REFINE_TASK,
    CheckReply,
    CheckRequest,
    GetRole,
    RefineRequest,
    RoleList,
    RoleRecord,
    RolesAgent,
)
from dspyrt.agents.roles.core import (
    CORPORATE_PATTERNS,
    DEFAULT_TARGET_CONTEXT,
    PATTERN_NAMES,
    Change,
    CorporatePattern,
    Finding,
    Proposal,
    RoleDefinition,
    RoleRefinementResult,
    RoleRefinementSystem,
    RoleType,
    check_role,
    find_patterns,
    important_responsibilities,
    patterns_in,
    proposal_score,
    scrub,
)
from dspyrt.agents.roles.program import (
    BUNDLED_DEMOS,
    RefineRole,
    RoleRefinementMetric,
    RoleRefiner,
    default_demos,
    example_row,
    role_refinement_metric,
)
from dspyrt.agents.roles.store import RolePointer, RoleStore

__all__ = [
    "BUNDLED_DEMOS",
    "CORPORATE_PATTERNS",
    "DEFAULT_TARGET_CONTEXT",
    "PATTERN_NAMES",
    "REFINE_TASK",
    "Change",
    "CheckReply",
    "CheckRequest",
    "CorporatePattern",
    "Finding",
    "GetRole",
    "Proposal",
    "RefineRequest",
    "RefineRole",
    "RoleDefinition",
    "RoleList",
    "RolePointer",
    "RoleRecord",
    "RoleRefinementMetric",
    "RoleRefinementResult",
    "RoleRefinementSystem",
    "RoleRefiner",
    "RoleStore",
    "RoleType",
    "RolesAgent",
    "check_role",
    "default_demos",
    "example_row",
    "find_patterns",
    "important_responsibilities",
    "patterns_in",
    "proposal_score",
    "role_refinement_metric",
    "scrub",
]
