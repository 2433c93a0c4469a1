"""The assertions area's layout: messages at the bottom, validators below the framework, no import cycle."""

from __future__ import annotations

import pytest

from tests.test_packaging import cycles, import_graph

pytestmark = pytest.mark.timeout(30)

AREA = "dspyrt.agents.assertions"
VALIDATORS = ("code_quality", "custom", "logic", "performance", "security")


def area_graph() -> dict[str, set[str]]:
    """The area's modules and the area modules each imports (in functions too), without the package itself."""
    graph = import_graph()
    inside = {m for m in graph if m.startswith(AREA + ".")}
    return {m: {t for t in targets if t in inside} for m, targets in graph.items() if m in inside}


def test_the_area_has_no_import_cycle() -> None:
    assert cycles(area_graph()) == []


def test_validators_import_the_messages_never_the_framework() -> None:
    graph = area_graph()
    for name in VALIDATORS:
        assert f"{AREA}.core" not in graph[f"{AREA}.{name}"], name
    assert graph[f"{AREA}.models"] == set()  # the messages depend on nothing else of the area
