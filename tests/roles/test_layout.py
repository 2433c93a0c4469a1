"""The roles area's layout: messages at the bottom, the DSPy program below the system, no import cycle."""

from __future__ import annotations

import pytest

from tests.test_packaging import cycles, import_graph

pytestmark = pytest.mark.timeout(30)

AREA = "dspyrt.agents.roles"


def area_graph() -> dict[str, set[str]]:
    """The area's modules and the area modules each imports (in functions too), without the package itself."""
    graph = import_graph()
    inside = {m for m in graph if m.startswith(AREA + ".")}
    return {m: {t for t in targets if t in inside} for m, targets in graph.items() if m in inside}


def test_the_area_has_no_import_cycle() -> None:
    assert cycles(area_graph()) == []


def test_the_program_and_the_store_never_import_the_system() -> None:
    graph = area_graph()
    for name in ("program", "store", "patterns", "proposal", "models"):
        assert f"{AREA}.core" not in graph[f"{AREA}.{name}"], name
    assert graph[f"{AREA}.models"] <= {f"{AREA}.text"}  # the messages depend only on how text is read
