"""The corporate patterns and the deterministic checks that find and remove them (regular expressions, no LM)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from dspyrt.agents.roles.models import FieldName, Finding, RoleDefinition
from dspyrt.agents.roles.text import normalize, single_spaces

_SOLO = re.compile(r"\b(?:solo|indie|single developer|one person|one developer|individual developer|lone)\b")


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


def patterns_in(text: str) -> list[str]:
    """Names of the corporate patterns ``text`` matches, in the order of :data:`CORPORATE_PATTERNS`."""
    norm = normalize(text)
    return [p.name for p in CORPORATE_PATTERNS if p.regex.search(norm)]


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
            norm = single_spaces(pattern.regex.sub(" ", norm))
        if not patterns_in(norm):
            break
    words = norm.strip(" ,;:.")
    # Joining words left dangling at either end, or doubled, by a removed phrase.
    joiners = r"(?:and|or|with|for|of|to|the|a|an|by|via|per|through|across|including|plus)"
    words = re.sub(rf"^(?:{joiners}\b[ ,]*)+", "", words)
    words = re.sub(rf"(?:[ ,]*\b{joiners})+$", "", words)
    words = re.sub(rf"\b({joiners})(?: {joiners})+\b", r"\1", words)
    return single_spaces(words).strip(" ,;:.")


def is_solo_context(target_context: str) -> bool:
    """Whether a target context describes one developer working alone."""
    return bool(_SOLO.search(normalize(target_context)))
