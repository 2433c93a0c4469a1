"""The guide's role refinement in plain Python: ``RoleType``, ``RoleDefinition``, ``RoleRefinementResult`` and
``RoleRefinementSystem``, with the deterministic corporate-pattern checks. ``dspyrt.agents.roles.agent`` puts it on
the bus.

A refinement has two parts, and the result says which part produced what:

1. **The LM part** (``dspyrt.agents.roles.program``, a DSPy program): proposes a rewritten focus, context and list of
   responsibilities for the target context, and a mapping of rewritten responsibilities.
2. **The deterministic pass** (:meth:`RoleRefinementSystem.apply`, regular expressions, no LM): finds the corporate
   patterns before and after, and enforces the rules whatever the LM answered —

   * a responsibility that matches a corporate pattern is rewritten (when the LM's rewrite is itself clean) or
     removed;
   * a responsibility listed in ``keep``, or one that matches no pattern, is kept, word for word (a ``keep``
     responsibility that is itself corporate may be replaced by a clean LM rewrite, else it is kept and reported);
   * an LM suggestion that still matches a pattern is dropped; a focus or context the LM left corporate (or did
     not answer) is scrubbed of the matched phrases.

So the result is correct even when the LM output is weak (on the offline demo engine, or a small model): the LM
decides how good the rewrites are, never whether corporate patterns survive.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, field_validator, model_validator

from dspyrt.bus import Message

DEFAULT_TARGET_CONTEXT = "solo developer"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
MAX_ADDED = 5
"""At most this many responsibilities the LM invents (beyond rewrites) are accepted."""
MAX_RESPONSIBILITIES = 50
MAX_RESPONSIBILITY_LENGTH = 300
_MAX_TEXT = {"focus": 1_000, "context": 4_000}

_SEPARATORS = re.compile(r"[_\-/]+")
_SPACES = re.compile(r"\s+")
# What an LM writes when it has no answer (the demo engine's fallback is "unknown").
_NO_ANSWER = frozenset({"", "unknown", "none", "n/a", "na", "null", "-"})
_CUSTOM_NEEDS_NAME = "a custom role needs custom_name (letters, digits, '_' or '-'), e.g. 'release-manager'"
_SOLO = re.compile(r"\b(?:solo|indie|single developer|one person|one developer|individual developer|lone)\b")


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
    focus: str = Field(min_length=1, max_length=_MAX_TEXT["focus"])
    context: str = Field(default="", max_length=_MAX_TEXT["context"])
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
        lines += [f"- {_words(r)}" for r in self.responsibilities]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the checks


@dataclass(frozen=True)
class CorporatePattern:
    """One corporate pattern: a name, what it stands for, and the expression that finds it."""

    name: str
    description: str
    regex: re.Pattern[str]


def _pattern(name: str, description: str, *alternatives: str) -> CorporatePattern:
    return CorporatePattern(name, description, re.compile("|".join(rf"\b(?:{a})\b" for a in alternatives)))


# Expressions run on normalize()d text: lower case, '_', '-' and '/' read as spaces, single spaces.
CORPORATE_PATTERNS: tuple[CorporatePattern, ...] = (
    _pattern(
        "stakeholder_management",
        "stakeholders and managing them",
        r"stake ?holders?(?: (?:management|analysis|mapping|engagement|alignment|communication|interviews?|"
        r"meetings?|expectations|relations|updates?|reviews?))?",
    ),
    _pattern(
        "approval_chain",
        "approval chains and gates",
        r"approval (?:chains?|process(?:es)?|workflows?|gates?|matri(?:x|ces)|levels?|cycles?|queues?)",
        r"(?:get|gets|getting|obtain|obtains|obtaining|seek|seeking|secure|securing) (?:\w+ )?approvals?",
        r"approvals? from",
        r"chain of (?:approvals?|command)",
        r"multi (?:level|stage|step) approvals?",
        r"approved by (?:management|leadership|the board|the committee)",
    ),
    _pattern("sign_off", "sign-offs", r"sign ?offs?", r"sign(?:ed|ing|s)? off"),
    _pattern(
        "steering_committee",
        "steering committees and review boards",
        r"steering (?:committees?|groups?|boards?|meetings?)",
        r"change advisory boards?",
        r"cab",
        r"architecture review boards?",
        r"review boards?",
    ),
    _pattern(
        "status_reporting",
        "status reporting to management",
        r"status (?:reports?|reporting|updates?|meetings?|decks?|calls?)"
        r"(?: (?:to|for) (?:management|leadership|executives?|the board|senior management|upper management))?",
        r"report(?:s|ing)? (?:\w+ )?to (?:management|leadership|executives?|the board|senior management|"
        r"upper management|the steering committee)",
        r"updates? (?:to|for) (?:management|leadership|executives?)",
        r"executive (?:summar(?:y|ies)|reports?|updates?|briefings?)",
    ),
    _pattern(
        "cross_functional_alignment",
        "cross-functional alignment meetings",
        r"cross (?:functional|team|departmental)",
        r"alignment (?:meetings?|sessions?|workshops?|calls?)",
        r"align(?:s|ing|ment)? (?:with|across) (?:teams?|departments?|business units?|stakeholders?|leadership|"
        r"management|other teams)",
        r"inter ?departmental",
        r"handoffs? (?:between|across) teams",
    ),
    _pattern(
        "compliance_review",
        "compliance, legal and regulatory reviews",
        r"compliance (?:reviews?|audits?|checks?|boards?|gates?|process(?:es)?|sign ?offs?)",
        r"(?:legal|regulatory|audit) reviews?",
        r"risk committees?",
    ),
    _pattern(
        "enterprise_ceremony",
        "enterprise process and ceremony",
        r"enterprise",
        r"ceremon(?:y|ies|ial)",
        r"governance",
        r"raci",
        r"business case",
        r"change (?:request|management) (?:forms?|process(?:es)?|tickets?)",
        r"quarterly business reviews?",
        r"qbrs?",
        r"headcount",
        r"budget approvals?",
        r"org(?:anizational)? charts?",
        r"escalation (?:paths?|matri(?:x|ces)|procedures?|chains?)",
    ),
    _pattern(
        "business_management",
        "business strategy, priorities and management buy-in",
        r"business (?:strateg(?:y|ies)|priorit(?:y|ies|ization|isation)|alignment|units?|objectives?|owners?)",
        r"management (?:buy in|reviews?|approvals?|expectations)",
        r"buy in",
        r"executive (?:sponsors?|sponsorship|alignment)",
        r"leadership (?:reviews?|alignment)",
        r"resource allocation across teams",
        r"portfolio management",
    ),
)
PATTERN_NAMES: tuple[str, ...] = tuple(p.name for p in CORPORATE_PATTERNS)


def normalize(text: str) -> str:
    """Text as the checks read it: lower case, ``_``, ``-`` and ``/`` as spaces, single spaces, trimmed."""
    return _SPACES.sub(" ", _SEPARATORS.sub(" ", text.lower())).strip()


def _words(text: str) -> str:
    return _SPACES.sub(" ", _SEPARATORS.sub(" ", text)).strip()


def patterns_in(text: str) -> list[str]:
    """Names of the corporate patterns ``text`` matches, in the order of :data:`CORPORATE_PATTERNS`."""
    norm = normalize(text)
    return [p.name for p in CORPORATE_PATTERNS if p.regex.search(norm)]


FieldName = Literal["focus", "context", "responsibilities"]


class Finding(Message):
    """One corporate pattern found in one field (for responsibilities: in one of them, ``item``)."""

    pattern: str
    field: FieldName
    match: str
    item: str | None = None


def find_patterns(focus: str, context: str, responsibilities: Iterable[str]) -> list[Finding]:
    """Every match of every pattern in the three fields (deterministic; no LM)."""
    found: list[Finding] = []
    parts: list[tuple[FieldName, str, str | None]] = [("focus", focus, None), ("context", context, None)]
    parts += [("responsibilities", r, r) for r in responsibilities]
    for where, text, item in parts:
        norm = normalize(text)
        for pattern in CORPORATE_PATTERNS:
            for match in pattern.regex.finditer(norm):
                found.append(Finding(pattern=pattern.name, field=where, match=match.group(0), item=item))
    return found


def check_role(role: RoleDefinition) -> list[Finding]:
    """The corporate patterns in a role's focus, context and responsibilities."""
    return find_patterns(role.focus, role.context, role.responsibilities)


def scrub(text: str) -> str:
    """``text`` without the phrases that match a corporate pattern, tidied (dangling 'and', commas, ...).

    The result is normalized text (lower case, separators as spaces).
    """
    norm = normalize(text)
    for _ in range(5):  # removing a phrase can join words into a new match: repeat until none is left
        for pattern in CORPORATE_PATTERNS:
            norm = _SPACES.sub(" ", pattern.regex.sub(" ", norm))
        if not patterns_in(norm):
            break
    words = norm.strip(" ,;:.")
    # Joining words left dangling at either end, or doubled, by a removed phrase.
    joiners = r"(?:and|or|with|for|of|to|the|a|an|by|via|per|through|across|including|plus)"
    words = re.sub(rf"^(?:{joiners}\b[ ,]*)+", "", words)
    words = re.sub(rf"(?:[ ,]*\b{joiners})+$", "", words)
    words = re.sub(rf"\b({joiners})(?: {joiners})+\b", r"\1", words)
    return _SPACES.sub(" ", words).strip(" ,;:.")


def is_solo_context(target_context: str) -> bool:
    """Whether a target context describes one developer working alone."""
    return bool(_SOLO.search(normalize(target_context)))


# ------------------------------------------------------------------------------------ proposal, result


@dataclass(frozen=True)
class Proposal:
    """What the LM proposed, as it answered (``None``: no usable answer for that field)."""

    focus: str | None = None
    context: str | None = None
    responsibilities: tuple[str, ...] | None = None
    rewrites: Mapping[str, str] = field(default_factory=dict)
    rationale: str = ""

    @classmethod
    def empty(cls) -> Proposal:
        """No LM answer at all: the deterministic pass alone decides."""
        return cls()

    @classmethod
    def from_outputs(
        cls, focus: Any, context: Any, responsibilities: Any, rewrites: Any, rationale: Any = ""
    ) -> Proposal:
        """Read an LM's raw outputs leniently: non-answers (``'unknown'``, empty) become ``None``."""
        items: tuple[str, ...] | None = None
        if isinstance(responsibilities, list | tuple):
            items = tuple(s for s in (str(r).strip() for r in responsibilities) if not _no_answer(s))
            items = items or None
        mapping: dict[str, str] = {}
        if isinstance(rewrites, Mapping):
            mapping = {str(k).strip(): str(v).strip() for k, v in rewrites.items() if not _no_answer(str(k))}
        return cls(
            focus=None if _no_answer(focus) else str(focus).strip(),
            context=None if _no_answer(context) else str(context).strip(),
            responsibilities=items,
            rewrites=mapping,
            rationale="" if _no_answer(rationale) else str(rationale).strip(),
        )


def _no_answer(value: Any) -> bool:
    return not isinstance(value, str) or normalize(value).strip(" .") in _NO_ANSWER


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


# ------------------------------------------------------------------------------------------ the system


def _shares(
    before_hits: int, after_hits: int, important: Sequence[str], kept: Iterable[str]
) -> tuple[float, float, float]:
    removed = 1.0 if before_hits == 0 else max(0.0, 1.0 - after_hits / before_hits)
    kept_keys = {normalize(k) for k in kept}
    wanted = {normalize(i) for i in important}
    kept_share = 1.0 if not wanted else len(wanted & kept_keys) / len(wanted)
    return round(removed, 4), round(kept_share, 4), round(removed * kept_share, 4)


def important_responsibilities(role: RoleDefinition) -> list[str]:
    """Responsibilities that must survive: those listed in ``keep`` and those that match no corporate pattern."""
    keep = {normalize(k) for k in role.keep}
    return [r for r in role.responsibilities if normalize(r) in keep or not patterns_in(r)]


def proposal_score(role: RoleDefinition, proposal: Proposal) -> float:
    """How good the LM's raw proposal is, by the same measure as :attr:`RoleRefinementResult.score`.

    Fields the LM did not answer count as unchanged. A responsibility counts as kept when the proposal lists it,
    or when the proposal rewrites it into text that matches no pattern.
    """
    before = len(check_role(role))
    listed = list(proposal.responsibilities) if proposal.responsibilities is not None else list(role.responsibilities)
    after = len(
        find_patterns(
            proposal.focus if proposal.focus is not None else role.focus,
            proposal.context if proposal.context is not None else role.context,
            listed,
        )
    )
    rewrites = {normalize(k): v for k, v in proposal.rewrites.items()}
    kept = list(listed)
    kept += [r for r in role.responsibilities if (v := rewrites.get(normalize(r))) and not patterns_in(v)]
    return _shares(before, after, important_responsibilities(role), kept)[2]


@dataclass
class RoleRefinementSystem:
    """Refines roles for a target context: the DSPy program proposes, the deterministic pass decides.

    ``program`` is the DSPy module that proposes rewrites (default: :class:`dspyrt.agents.roles.program.RoleRefiner`
    with its bundled demos). :meth:`refine` is blocking (it makes LM calls): run it in a worker thread.
    """

    program: Any = None

    def __post_init__(self) -> None:
        if self.program is None:
            from dspyrt.agents.roles.program import RoleRefiner

            self.program = RoleRefiner()

    @staticmethod
    def check(role: RoleDefinition) -> list[Finding]:
        """The corporate patterns in ``role`` (deterministic; no LM)."""
        return check_role(role)

    def propose(self, role: RoleDefinition, target_context: str, lm: Any) -> tuple[Proposal, list[str]]:
        """The LM part: run the program with ``lm``; an answer the adapter cannot parse is an empty proposal."""
        from dspyrt.agents.roles.program import run_refiner

        return run_refiner(self.program, role, target_context, lm)

    def refine(
        self, role: RoleDefinition, target_context: str = DEFAULT_TARGET_CONTEXT, *, lm: Any = None
    ) -> RoleRefinementResult:
        """Refine ``role`` for ``target_context``: the program's proposal with ``lm``, then the deterministic pass.

        With ``lm=None`` no LM is called and the deterministic pass alone removes the corporate patterns.
        """
        if lm is None:
            return self.apply(role, Proposal.empty(), target_context)
        proposal, warnings = self.propose(role, target_context, lm)
        return self.apply(role, proposal, target_context, lm_used=True, warnings=warnings)

    @staticmethod
    def apply(
        role: RoleDefinition,
        proposal: Proposal,
        target_context: str = DEFAULT_TARGET_CONTEXT,
        *,
        lm_used: bool = False,
        warnings: Sequence[str] = (),
    ) -> RoleRefinementResult:
        """The deterministic pass: build the refined role from ``proposal`` under the rules of this module."""
        return _Refinement(role, proposal, target_context, list(warnings)).run(lm_used)


class _Refinement:
    """One run of the deterministic pass (kept in one place so the rules read top to bottom)."""

    def __init__(self, role: RoleDefinition, proposal: Proposal, target: str, warnings: list[str]) -> None:
        self.role = role
        self.proposal = proposal
        self.target = target
        self.warnings = warnings
        self.changes: list[Change] = []
        self.final: list[str] = []
        self._taken: set[str] = set()

    def _take(self, item: str) -> bool:
        key = normalize(item)
        if key in self._taken:
            return False
        self._taken.add(key)
        self.final.append(item)
        return True

    def run(self, lm_used: bool) -> RoleRefinementResult:
        role, proposal = self.role, self.proposal
        findings_before = check_role(role)
        self._responsibilities()
        focus = self._text("focus", role.focus, proposal.focus)
        context = self._text("context", role.context, proposal.context)
        findings_after = find_patterns(focus, context, self.final)
        after = role.model_copy(
            update={
                "focus": focus,
                "context": context,
                "responsibilities": self.final,
                "keep": self._keep_after(),
                "solo_developer_optimized": role.solo_developer_optimized or is_solo_context(self.target),
                "corporate_patterns_removed": not findings_after,
            }
        )
        after = RoleDefinition.model_validate(after.model_dump())  # the refined role obeys the same rules
        removed, kept, score = _shares(
            len(findings_before), len(findings_after), important_responsibilities(role), self._kept_originals()
        )
        return RoleRefinementResult(
            name=role.name,
            target_context=self.target,
            before=role,
            after=after,
            findings_before=findings_before,
            findings_after=findings_after,
            patterns_found=_distinct(f.pattern for f in findings_before),
            patterns_remaining=_distinct(f.pattern for f in findings_after),
            changes=self.changes,
            patterns_removed_share=removed,
            responsibilities_kept_share=kept,
            score=score,
            lm_used=lm_used,
            lm_score=proposal_score(role, proposal) if lm_used else None,
            lm_rationale=proposal.rationale,
            warnings=self.warnings,
        )

    def _keep_after(self) -> list[str]:
        """``keep`` of the refined role: each kept responsibility as it now reads (its rewrite, if rewritten)."""
        now = {normalize(c.before): c.after for c in self.changes if c.before and c.after and c.kind != "removed"}
        return _distinct(a for k in self.role.keep if (a := now.get(normalize(k))))

    def _kept_originals(self) -> list[str]:
        """Originals that survive, as themselves or through an accepted rewrite."""
        survived = [c.before for c in self.changes if c.kind in ("kept", "restored", "rewritten") and c.before]
        return survived

    def _responsibilities(self) -> None:
        role, proposal = self.role, self.proposal
        keep = {normalize(k) for k in role.keep}
        listed = {normalize(r) for r in proposal.responsibilities or ()}
        rewrites = {normalize(k): v for k, v in proposal.rewrites.items()}
        originals = {normalize(r) for r in role.responsibilities}
        lm_answered = proposal.responsibilities is not None
        used_rewrites: set[str] = set()

        for item in role.responsibilities:
            key = normalize(item)
            found = patterns_in(item)
            rewrite = rewrites.get(key)
            if rewrite is not None:
                used_rewrites.add(normalize(rewrite))
            if not found:
                # Not corporate: kept word for word, whatever the LM did with it.
                self._take(item)
                if lm_answered and key not in listed:
                    why = "it is listed in keep" if key in keep else "it matches no corporate pattern"
                    self.changes.append(
                        Change(
                            kind="restored",
                            before=item,
                            after=item,
                            source="deterministic",
                            note=f"the LM dropped it; kept because {why}",
                        )
                    )
                else:
                    note = f"the LM's rewrite {rewrite!r} was not used: it is not corporate" if rewrite else ""
                    self.changes.append(Change(kind="kept", before=item, after=item, source="deterministic", note=note))
                continue
            problem = _suggestion_problem(rewrite) if rewrite is not None else "no rewrite"
            if problem is None and rewrite is not None:
                if self._take(rewrite):
                    self.changes.append(
                        Change(kind="rewritten", before=item, after=rewrite, patterns=found, source="lm")
                    )
                    continue
                problem = "it duplicates another responsibility"
            if key in keep:
                self._take(item)
                self.changes.append(
                    Change(
                        kind="kept",
                        before=item,
                        after=item,
                        patterns=found,
                        source="deterministic",
                        note="listed in keep although it matches a corporate pattern; reword it",
                    )
                )
                self.warnings.append(f"{item!r} is listed in keep but matches {', '.join(found)}; it stays as it is")
                continue
            source: Literal["lm", "deterministic"] = "deterministic"
            if rewrite is not None:
                note = f"the LM's rewrite {rewrite!r} was refused: {problem}"
            elif lm_answered and key not in listed:
                note, source = "the LM dropped it", "lm"
            elif lm_answered:
                note = "the LM kept it; removed by the corporate-pattern check"
            else:
                note = "no LM answer; removed by the corporate-pattern check"
            self.changes.append(Change(kind="removed", before=item, patterns=found, source=source, note=note))

        added = 0
        for item in proposal.responsibilities or ():
            key = normalize(item)
            if key in originals or key in used_rewrites or key in self._taken:
                continue
            found = patterns_in(item)
            problem = _suggestion_problem(item)
            if problem is not None:
                self.changes.append(
                    Change(
                        kind="rejected",
                        after=item,
                        patterns=found,
                        source="deterministic",
                        note=f"an LM suggestion refused: {problem}",
                    )
                )
            elif added >= MAX_ADDED or len(self.final) >= MAX_RESPONSIBILITIES:
                self.changes.append(
                    Change(
                        kind="rejected",
                        after=item,
                        source="deterministic",
                        note="too many new responsibilities suggested",
                    )
                )
            elif self._take(item):
                added += 1
                self.changes.append(Change(kind="added", after=item, source="lm"))

        if not self.final:
            # A role needs a responsibility: a placeholder keeps it valid, and says so.
            placeholder = f"{self.role.label} work for a {self.target}"
            if all("_" in r and " " not in r for r in role.responsibilities):
                placeholder = "_".join(normalize(placeholder).split())
            self._take(placeholder)
            note = "every responsibility was corporate and the LM suggested none: a placeholder; replace it"
            self.changes.append(Change(kind="added", after=placeholder, source="deterministic", note=note))
            self.warnings.append(f"{note} ({placeholder!r})")

    def _text(self, where: Literal["focus", "context"], before: str, suggested: str | None) -> str:
        found = patterns_in(before)
        if suggested is not None and len(suggested) > _MAX_TEXT[where]:
            self.warnings.append(f"the LM's {where} is longer than {_MAX_TEXT[where]} characters; not used")
            suggested = None
        if suggested is not None and not patterns_in(suggested):
            if normalize(suggested) != normalize(before):
                self.changes.append(Change(kind=where, before=before, after=suggested, patterns=found, source="lm"))
            return suggested
        if not found:
            if suggested is not None:
                self.changes.append(
                    Change(
                        kind="rejected",
                        after=suggested,
                        patterns=patterns_in(suggested),
                        source="deterministic",
                        note=f"an LM suggestion for the {where} refused: it matches a corporate pattern; "
                        "the original is kept",
                    )
                )
            return before
        cleaned = scrub(before)
        if len(cleaned) < 3 or patterns_in(cleaned):
            cleaned = (
                f"{self.role.label} work for a {self.target}" if where == "focus" else f"working as a {self.target}"
            )
        note = "no LM answer" if suggested is None else f"the LM's {where} still matches a corporate pattern"
        self.changes.append(
            Change(
                kind=where,
                before=before,
                after=cleaned,
                patterns=found,
                source="deterministic",
                note=f"{note}; corporate phrases removed",
            )
        )
        return cleaned


def _suggestion_problem(text: str) -> str | None:
    """Why an LM-suggested responsibility cannot be used, or ``None`` when it can."""
    if _no_answer(text):
        return "it is empty"
    if len(text) > MAX_RESPONSIBILITY_LENGTH:
        return f"it is longer than {MAX_RESPONSIBILITY_LENGTH} characters"
    found = patterns_in(text)
    if found:
        return f"it matches {', '.join(found)}"
    return None


def _distinct(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
