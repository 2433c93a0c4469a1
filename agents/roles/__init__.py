"""The guide's role refinement: rewrite agent roles for a target context (e.g. a solo developer) without
corporate patterns, version them, and serve them to other agents.

    from dspyrt.agents.roles import RoleDefinition, RoleRefinementSystem, RoleType

    role = RoleDefinition(role_type=RoleType.PLANNER, focus="business strategy and stakeholder management",
                          context="enterprise system overview",
                          responsibilities=["stakeholder_analysis", "business_priority_assessment"])
    result = RoleRefinementSystem().refine(role, "solo developer", lm=dspy_lm)   # lm=None: checks only

Modules: ``models`` (the messages: ``RoleDefinition``, ``RoleRefinementResult``, the agent's requests and replies),
``core`` (``RoleRefinementSystem`` and its deterministic pass), ``patterns`` (the corporate patterns and the checks),
``proposal`` (what the LM proposed, and its score), ``program`` (the DSPy program ``RoleRefiner`` and its bundled
demos), ``text`` (how role text is normalized), ``store`` (the versioned KV store) and ``agent`` (the ``roles``
agent).
"""

from dspyrt.agents.roles.agent import RolesAgent
from dspyrt.agents.roles.core import RoleRefinementSystem
from dspyrt.agents.roles.models import (
    DEFAULT_TARGET_CONTEXT,
    REFINE_TASK,
    Change,
    CheckReply,
    CheckRequest,
    Finding,
    GetRole,
    RefineRequest,
    RoleDefinition,
    RoleList,
    RolePointer,
    RoleRecord,
    RoleRefinementResult,
    RoleType,
)
from dspyrt.agents.roles.patterns import (
    CORPORATE_PATTERNS,
    PATTERN_NAMES,
    CorporatePattern,
    check_role,
    find_patterns,
    patterns_in,
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
from dspyrt.agents.roles.proposal import Proposal, important_responsibilities, proposal_score
from dspyrt.agents.roles.store import RoleStore

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
