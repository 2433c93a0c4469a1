"""The roles area's messages: role definitions, what a refinement found and changed, its result, and the
requests and replies of the ``roles`` agent."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import ConfigDict, Field, FiniteFloat, StringConstraints, field_validator, model_validator

from dspyrt.agents.roles.text import normalize, words
from dspyrt.bus import Message
from dspyrt.bus.events import EventData

# The durable task kind of a role refinement (the roles agent serves it; clients submit it).
REFINE_TASK = "refine-role"
DEFAULT_TARGET_CONTEXT = "solo developer"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
MAX_RESPONSIBILITIES = 50
MAX_RESPONSIBILITY_LENGTH = 300
MAX_TEXT = {"focus": 1_000, "context": 4_000}
"""Longest focus and context, in characters."""

_CUSTOM_NEEDS_NAME = "a custom role needs custom_name (letters, digits, '_' or '-'), e.g. 'release-manager'"


class RoleType(StrEnum):
    """The kinds of role; ``custom`` roles carry their own ``custom_name``."""

    PLANNER = "planner"
    CODER = "coder"
    RESEARCHER = "researcher"
    IMPLEMENTER = "implementer"
    REVIEWER = "reviewer"
    CUSTOM = "custom"


Responsibility = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_RESPONSIBILITY_LENGTH)
]


class RoleDefinition(Message):
    """An agent role: what it focuses on, in which context, with which responsibilities.

    ``name`` (the key roles are stored and fetched by) defaults to ``custom_name`` for custom roles and to the
    role type otherwise. ``keep`` lists responsibilities a refinement must keep.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    role_type: RoleType
    custom_name: str | None = Field(default=None, pattern=NAME_PATTERN, description="required for role_type custom")
    name: str = Field(default="", pattern=f"^$|{NAME_PATTERN}", description="defaults to custom_name or the role type")
    focus: str = Field(min_length=1, max_length=MAX_TEXT["focus"])
    context: str = Field(default="", max_length=MAX_TEXT["context"])
    responsibilities: list[Responsibility] = Field(min_length=1, max_length=MAX_RESPONSIBILITIES)
    keep: list[Responsibility] = Field(default_factory=list, max_length=MAX_RESPONSIBILITIES)
    solo_developer_optimized: bool = False
    corporate_patterns_removed: bool = False

    @field_validator("responsibilities")
    @classmethod
    def _no_duplicates(cls, items: list[str]) -> list[str]:
        seen: dict[str, str] = {}
        duplicates = []
        for item in items:
            key = normalize(item)
            if key in seen:
                duplicates.append(item)
            seen[key] = item
        if duplicates:
            raise ValueError(f"duplicate responsibilities: {', '.join(repr(d) for d in duplicates)}")
        return items

    @model_validator(mode="after")
    def _consistent(self) -> RoleDefinition:
        if self.role_type is RoleType.CUSTOM and not self.custom_name:
            raise ValueError(_CUSTOM_NEEDS_NAME)
        if self.role_type is not RoleType.CUSTOM and self.custom_name:
            raise ValueError(f"custom_name is only for role_type 'custom', not {self.role_type.value!r}")
        if not self.name:
            self.name = self.label
        known = {normalize(r) for r in self.responsibilities}
        unknown = [k for k in self.keep if normalize(k) not in known]
        if unknown:
            raise ValueError(f"keep lists {', '.join(repr(k) for k in unknown)}, not among the responsibilities")
        return self

    @property
    def label(self) -> str:
        """The role's kind in words: the custom name for custom roles, else the role type."""
        return self.custom_name if self.role_type is RoleType.CUSTOM and self.custom_name else self.role_type.value

    def as_instructions(self) -> str:
        """The role as a few lines of system prompt, for an agent that plays it."""
        lines = [f"You act as the {self.label} ({self.name}).", f"Focus: {self.focus}"]
        if self.context:
            lines.append(f"Context: {self.context}")
        lines.append("Responsibilities:")
        lines += [f"- {words(r)}" for r in self.responsibilities]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ findings, result

FieldName = Literal["focus", "context", "responsibilities"]


class Finding(Message):
    """One corporate pattern found in one field (for responsibilities: in one of them, ``item``)."""

    pattern: str
    field: FieldName
    match: str
    item: str | None = None


ChangeKind = Literal["kept", "restored", "rewritten", "removed", "added", "rejected", "focus", "context"]


class Change(Message):
    """One change a refinement made, and whether the LM or the deterministic pass made it.

    ``kept``: a responsibility stays as it was; ``restored``: the LM dropped it but it must stay; ``rewritten``:
    a corporate responsibility replaced by the LM's clean rewrite; ``removed``: a corporate responsibility
    dropped; ``added``: a new responsibility the LM suggested; ``rejected``: an LM suggestion the checks refused;
    ``focus`` / ``context``: the field changed.
    """

    kind: ChangeKind
    before: str | None = None
    after: str | None = None
    patterns: list[str] = Field(default_factory=list)
    source: Literal["lm", "deterministic"]
    note: str = ""


class RoleRefinementResult(Message):
    """A refinement: the role before and after, what was found before and what remains, every change, a score.

    ``score`` = ``patterns_removed_share * responsibilities_kept_share`` of the final role; ``lm_score`` is the
    same measure of the LM's raw proposal alone (before the deterministic pass), ``None`` when no LM was used.
    """

    name: str
    version: int | None = None
    target_context: str
    before: RoleDefinition
    after: RoleDefinition
    findings_before: list[Finding] = Field(default_factory=list)
    findings_after: list[Finding] = Field(default_factory=list)
    patterns_found: list[str] = Field(default_factory=list)
    patterns_remaining: list[str] = Field(default_factory=list)
    changes: list[Change] = Field(default_factory=list)
    patterns_removed_share: float
    responsibilities_kept_share: float
    score: float
    lm_used: bool = False
    lm_score: float | None = None
    lm_rationale: str = ""
    model: str | None = None
    lm_calls: int = 0
    warnings: list[str] = Field(default_factory=list)
    task_id: str | None = None
    created_at: float = Field(default_factory=time.time)


# ------------------------------------------------------------------------------------------ stored roles


class RolePointer(Message):
    """The latest version of a role, with enough to list roles without reading every version."""

    name: str
    latest: int = Field(ge=1)
    role_type: str
    target_context: str
    score: float
    updated_at: float = Field(default_factory=time.time)


# ------------------------------------------------------------------------------------------ the roles agent


class RefineRequest(Message):
    """Refine ``role`` for ``target_context``. ``use_lm=False`` runs the deterministic checks alone."""

    role: RoleDefinition
    target_context: str = Field(default=DEFAULT_TARGET_CONTEXT, min_length=1, max_length=200)
    model: str | None = Field(default=None, description="pin a model; else the switcher selects for refine-role")
    use_lm: bool = True
    save: bool = Field(default=True, description="store the result as the role's next version")
    max_lm_calls: int = Field(default=4, ge=1, le=20, description="budget: the adapters may retry a bad answer")


class CheckRequest(Message):
    role: RoleDefinition


class CheckReply(Message):
    name: str
    clean: bool
    patterns: list[str]
    corporate_responsibilities: list[str]
    findings: list[Finding]


class GetRole(Message):
    name: str = Field(pattern=NAME_PATTERN)
    version: int | None = Field(default=None, ge=1)


class RoleRecord(Message):
    """One stored version of a role: ``role`` is the refined definition, ``refinement`` how it was made."""

    name: str
    version: int
    latest: int
    versions: list[int]
    role: RoleDefinition
    refinement: RoleRefinementResult


class RoleList(Message):
    roles: list[RolePointer] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------- events


class RoleRefined(EventData):
    """A role was refined (``role.refined``): its new version, its score and the corporate patterns left."""

    topic: ClassVar[str] = "role.refined"

    name: str = Field(description="the role's name")
    version: int | None = Field(default=None, ge=1, description="the stored version (none when not saved)")
    score: FiniteFloat = Field(description="patterns removed share x responsibilities kept share, 0 to 1")
    lm_score: FiniteFloat | None = Field(default=None, description="the same measure of the LM's raw proposal")
    patterns_found: list[str] = Field(default_factory=list, description="corporate patterns found before")
    patterns_remaining: list[str] = Field(default_factory=list, description="corporate patterns still there")
    task_id: str | None = Field(default=None, description="the refine-role task's id (none from the endpoint)")

    @classmethod
    def of(cls, result: RoleRefinementResult, task_id: str | None) -> RoleRefined:
        """The event of a refinement ``result`` (made by task ``task_id``, if by a task)."""
        return cls(task_id=task_id, **result.model_dump(include=set(cls.model_fields) - {"task_id"}))
