"""The CLI's layout: the shared modules below the command modules, no import cycle, nothing of the agents imported.

``dspyrt.runtime.cli`` assembles the app; the command modules (``cli_*``) build on the shared ones (``cli_output``,
``cli_common``, ``cli_input``, ``cli_results``), which import no command module. What a command needs of the agents
(the optimizer reference) comes through an entry point, as the agents themselves do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dspyrt.bus import ConfigurationError
from dspyrt.runtime.cli_optimizers import OPTIMIZERS_REFERENCE, REFERENCE_GROUP, optimizer_docs, reference_registry
from tests.test_packaging import cycles, import_graph

pytestmark = pytest.mark.timeout(60)

DSPYRT = Path(sys.executable).parent / "dspyrt"
CLI = "dspyrt.runtime.cli"
# The modules every command shares, each importing only the ones before it.
SHARED = (
    "dspyrt.runtime.cli_output",
    "dspyrt.runtime.cli_common",
    "dspyrt.runtime.cli_input",
    "dspyrt.runtime.cli_results",
)
INSTALLED_REFERENCE = "dspyrt.agents.optimizers.reference:optimizer_reference"


def is_cli(module: str) -> bool:
    return module == CLI or module.startswith(CLI + "_")


def test_the_cli_modules_form_no_cycle_and_import_no_agent() -> None:
    graph = import_graph()
    cli_modules = {module for module in graph if is_cli(module)}
    assert set(SHARED) <= cli_modules
    assert [cycle for cycle in cycles(graph) if cli_modules & set(cycle)] == []
    upward = [
        f"{m} -> {target}" for m in sorted(cli_modules) for target in graph[m] if target.startswith("dspyrt.agents")
    ]
    assert upward == []


def test_the_shared_modules_import_no_command_module_and_nothing_imports_the_app() -> None:
    graph = import_graph()
    assert sorted(module for module, targets in graph.items() if CLI in targets) == []
    for i, module in enumerate(SHARED):
        assert sorted(t for t in graph[module] if is_cli(t) and t not in SHARED[:i]) == [], module


def test_python_m_runs_the_app_and_debug_reaches_a_command_module(tmp_path: Path) -> None:
    """``python -m dspyrt.runtime.cli`` (the app run as ``__main__``): ``--debug`` is seen by the error printing a
    command module shares (roles refine's missing file), as with the installed ``dspyrt``."""
    command = [sys.executable, "-m", CLI, "--debug", "roles", "refine", "nope.json"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error not_found: nope.json: no such role file"


# ------------------------------------------------------------------------------------ optimizer reference


def fake_reference() -> list[Any]:
    parameter = SimpleNamespace(name="k", type="int", constraints=">= 1", description=None, default_text=lambda: "16")
    return [SimpleNamespace(name="fake", wraps=None, summary="", parameters=[parameter])]


NOT_CALLABLE = "a reference is a function"


def entry(value: str) -> EntryPoint:
    return EntryPoint(OPTIMIZERS_REFERENCE, value, REFERENCE_GROUP)


def test_the_optimizer_reference_is_the_entry_points() -> None:
    (doc,) = optimizer_docs(reference_registry([entry(f"{__name__}:fake_reference")]))
    assert doc.name == "fake"
    assert doc.parameters is not None and doc.parameters[0].default_text() == "16"


def test_without_a_reference_the_error_says_how_to_install_it() -> None:
    with pytest.raises(ConfigurationError) as caught:
        optimizer_docs(reference_registry([]))
    assert f"entry point 'optimizers' in group '{REFERENCE_GROUP}'" in caught.value.message
    assert "pip install -e ." in caught.value.message


def test_a_reference_that_is_not_callable_is_refused_by_name() -> None:
    with pytest.raises(ConfigurationError) as caught:
        optimizer_docs(reference_registry([entry(f"{__name__}:NOT_CALLABLE")]))
    assert f"{__name__}:NOT_CALLABLE" in caught.value.message and "is not callable" in caught.value.message


def test_dspyrt_optimizers_finds_the_reference_a_distribution_registers(tmp_path: Path) -> None:
    """The command end to end, its reference registered by a distribution on the path (dspyrt's own pyproject.toml
    registers the same one: two distributions naming the same object are one reference)."""
    dist_info = tmp_path / "reference_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: reference-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        f"[{REFERENCE_GROUP}]\n{OPTIMIZERS_REFERENCE} = {INSTALLED_REFERENCE}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [str(DSPYRT), "optimizers", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert '"name": "labeled_fewshot"' in done.stdout
