"""How role text is read: the normalized form two responsibilities compare in, and plain words."""

from __future__ import annotations

import re

_SEPARATORS = re.compile(r"[_\-/]+")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Text as the checks read it: lower case, ``_``, ``-`` and ``/`` as spaces, single spaces, trimmed."""
    return _SPACES.sub(" ", _SEPARATORS.sub(" ", text.lower())).strip()


def words(text: str) -> str:
    """``text`` with ``_``, ``-`` and ``/`` as spaces and single spaces (case kept): ``stakeholder analysis``."""
    return single_spaces(_SEPARATORS.sub(" ", text)).strip()


def single_spaces(text: str) -> str:
    """``text`` with every run of whitespace as one space."""
    return _SPACES.sub(" ", text)
