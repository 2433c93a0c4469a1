"""Summary figures over measurements: the one percentile of the project.

Every latency percentile (the trace view, the evaluation's p50/p95 that the deploy gate checks, the performance
validator, the dashboard's model summaries, the switcher's figures) is this nearest-rank percentile, so two
components shown the same measurements report the same figure and a gate and a validator give the same verdict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (``q`` in 0..100) of ``values``: the smallest observed value with at least
    ``q`` percent of the values at or below it.

    Always one of the measurements, never a value between two (conservative for a gate: the p95 of ``[10, 100]``
    is 100). ``q = 0`` gives the smallest value, ``q = 100`` the largest. Raises ``ValueError`` when ``values`` is
    empty: there is no figure to report, and the caller decides what it shows instead.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, not {q}")
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    # Rounded before ceil: q is a decimal figure (99.9) whose binary error must not push the rank one higher.
    rank = max(1, math.ceil(round(q * len(ordered) / 100, 9)))
    return ordered[rank - 1]
