"""The guide's role refinement in plain Python: ``RoleRefinementSystem`` and its deterministic pass.
``dspyrt.agents.roles.agent`` puts it on the bus; the messages (``RoleDefinition``, ``RoleRefinementResult``, ...)
live in ``dspyrt.agents.roles.models``, the corporate-pattern checks in ``dspyrt.agents.roles.patterns``.

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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dspyrt.agents.roles.models import (
    DEFAULT_TARGET_CONTEXT,
    MAX_RESPONSIBILITIES,
    MAX_RESPONSIBILITY_LENGTH,
    MAX_TEXT,
    Change,
    Finding,
    RoleDefinition,
    RoleRefinementResult,
)
from dspyrt.agents.roles.patterns import check_role, find_patterns, is_solo_context, patterns_in, scrub
from dspyrt.agents.roles.program import RoleRefiner, run_refiner
from dspyrt.agents.roles.proposal import (
    Proposal,
    important_responsibilities,
    is_no_answer,
    proposal_score,
    score_shares,
)
from dspyrt.agents.roles.text import normalize

MAX_ADDED = 5
"""At most this many responsibilities the LM invents (beyond rewrites) are accepted."""


@dataclass
class RoleRefinementSystem:
    """Refines roles for a target context: the DSPy program proposes, the deterministic pass decides.

    ``program`` is the DSPy module that proposes rewrites (default: :class:`dspyrt.agents.roles.program.RoleRefiner`
    with its bundled demos). :meth:`refine` is blocking (it makes LM calls): run it in a worker thread.
    """

    program: Any = None

    def __post_init__(self) -> None:
        if self.program is None:
            self.program = RoleRefiner()

    @staticmethod
    def check(role: RoleDefinition) -> list[Finding]:
        """The corporate patterns in ``role`` (deterministic; no LM)."""
        return check_role(role)

    def propose(self, role: RoleDefinition, target_context: str, lm: Any) -> tuple[Proposal, list[str]]:
        """The LM part: run the program with ``lm``; an answer the adapter cannot parse is an empty proposal."""
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
        removed, kept, score = score_shares(
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
        if suggested is not None and len(suggested) > MAX_TEXT[where]:
            self.warnings.append(f"the LM's {where} is longer than {MAX_TEXT[where]} characters; not used")
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
    if is_no_answer(text):
        return "it is empty"
    if len(text) > MAX_RESPONSIBILITY_LENGTH:
        return f"it is longer than {MAX_RESPONSIBILITY_LENGTH} characters"
    found = patterns_in(text)
    if found:
        return f"it matches {', '.join(found)}"
    return None


def _distinct(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
