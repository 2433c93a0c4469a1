"""What the LM proposed (:class:`Proposal`), read leniently, and how good it is (:func:`proposal_score`, the
same measure as :attr:`~dspyrt.agents.roles.models.RoleRefinementResult.score`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspyrt.agents.roles.models import RoleDefinition
from dspyrt.agents.roles.patterns import check_role, find_patterns, patterns_in
from dspyrt.agents.roles.text import normalize

# What an LM writes when it has no answer (the demo engine's fallback is "unknown").
_NO_ANSWER = frozenset({"", "unknown", "none", "n/a", "na", "null", "-"})


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
            items = tuple(s for s in (str(r).strip() for r in responsibilities) if not is_no_answer(s))
            items = items or None
        mapping: dict[str, str] = {}
        if isinstance(rewrites, Mapping):
            mapping = {str(k).strip(): str(v).strip() for k, v in rewrites.items() if not is_no_answer(str(k))}
        return cls(
            focus=None if is_no_answer(focus) else str(focus).strip(),
            context=None if is_no_answer(context) else str(context).strip(),
            responsibilities=items,
            rewrites=mapping,
            rationale="" if is_no_answer(rationale) else str(rationale).strip(),
        )


def is_no_answer(value: Any) -> bool:
    """Whether an LM's output is no answer: not text, empty, or a filler such as ``'unknown'`` or ``'n/a'``."""
    return not isinstance(value, str) or normalize(value).strip(" .") in _NO_ANSWER


def score_shares(
    before_hits: int, after_hits: int, important: Sequence[str], kept: Iterable[str]
) -> tuple[float, float, float]:
    """``(patterns_removed_share, responsibilities_kept_share, score)``: the share of pattern matches gone, the share
    of ``important`` responsibilities among ``kept``, and their product."""
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
    return score_shares(before, after, important_responsibilities(role), kept)[2]
