"""The package as it installs: one top-level name (``dspyrt``), its public API, and a module graph with no cycles.

The folders stay at the repository root (``bus/``, ``runtime/``, ``agents/``); pyproject.toml maps them under
``dspyrt``. These tests read the source tree and the built wheel, never a hand-kept list of expectations.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import dspyrt

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"bus": "dspyrt.bus", "runtime": "dspyrt.runtime", "agents": "dspyrt.agents"}
LAYERS = ("dspyrt.bus", "dspyrt.runtime", "dspyrt.agents")  # each imports only from the ones before it
OLD_TOP_LEVEL = frozenset(FOLDERS)

pytestmark = pytest.mark.timeout(60)


def source_modules() -> dict[str, Path]:
    """Every module of the package by its import name (``dspyrt.agents.loop.cycle``)."""
    found = {"dspyrt": ROOT / "dspyrt" / "__init__.py"}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, at module level or inside a function (an import moved into a function to
    dodge a cycle is still a cycle); ``TYPE_CHECKING`` blocks are excluded (annotations only, never executed).

    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module, else ``pkg`` itself.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(node.body)
            elif isinstance(node, ast.If | ast.Try | ast.With | ast.For | ast.AsyncFor | ast.While | ast.AsyncWith):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    resolved = set()
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def layer_of(module: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")), None)


# ------------------------------------------------------------------------------------------------ the source tree


def test_no_module_imports_the_old_top_level_names() -> None:
    """``import agents`` would be openai-agents' package once installed beside it; every import names ``dspyrt.``."""
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if any(part.startswith(".") or part in {"build", "node_modules"} for part in path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            offenders += [f"{where} {name}" for name in names if name.split(".")[0] in OLD_TOP_LEVEL]
    assert offenders == []


def test_the_module_graph_has_no_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check above can fail: a two-module cycle and a three-module one are reported, an acyclic graph is not."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert cycles(graph) == [["a", "b"], ["c", "d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_layers_never_import_upward() -> None:
    """bus knows nothing of runtime or agents; runtime nothing of agents (it finds them through entry points)."""
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if (mine := layer_of(module)) is not None and (theirs := layer_of(target)) is not None and theirs > mine
    ]
    assert upward == []


def test_pyproject_lists_every_package_folder() -> None:
    """setuptools' package-dir mapping needs every package listed: a folder left out would be missing from the wheel."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"dspyrt"} | {
        ".".join([FOLDERS[init.relative_to(ROOT).parts[0]], *init.relative_to(ROOT).parts[1:-1]])
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert sorted(config["packages"]) == sorted(folders)
    assert config["package-dir"] == {"dspyrt": "dspyrt", **{pkg: folder for folder, pkg in FOLDERS.items()}}
    loose = [
        str(path.relative_to(ROOT))
        for folder in FOLDERS
        for path in (ROOT / folder).rglob("*.py")
        if not (path.parent / "__init__.py").is_file()
    ]
    assert loose == [], "a module in a folder without __init__.py is not packaged"


# ------------------------------------------------------------------------------------------------ the public API


def test_public_api_is_sorted_and_every_name_resolves() -> None:
    assert dspyrt.__all__ == sorted(dspyrt.__all__)
    assert set(dspyrt.__all__) == set(dspyrt._EXPORTS)
    for name in dspyrt.__all__:
        value = getattr(dspyrt, name)
        assert getattr(value, "__name__", name) == name, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = dspyrt.Nope


def test_importing_dspyrt_stays_cheap() -> None:
    """The names resolve on first use: ``import dspyrt`` loads neither NATS nor DSPy (the CLI's start-up)."""
    code = (
        "import sys, dspyrt; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nats', 'dspy', 'opentelemetry') "
        "or m.startswith(('dspyrt.bus', 'dspyrt.agents'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ the wheel


def uv() -> str | None:
    beside = Path(sys.executable).parent / "uv"
    return str(beside) if beside.is_file() else shutil.which("uv")


@pytest.mark.timeout(300)
def test_the_wheel_installs_only_dspyrt_and_lives_beside_openai_agents(tmp_path: Path) -> None:
    """``pip install .`` into a fresh venv gives ``dspyrt`` and no ``bus``/``runtime``/``agents``; openai-agents's own
    top-level ``agents`` package installs beside it and both import. Offline: everything comes from uv's cache,
    which the test set-up filled (openai-agents is in the ``test`` extra for this reason)."""
    installer = uv()
    if installer is None:
        pytest.skip("uv is not installed (make setup-test installs it): the wheel is built and installed with it")
    dist = tmp_path / "dist"
    subprocess.run(
        [installer, "build", "--wheel", "--offline", "--quiet", "--out-dir", str(dist), str(ROOT)],
        check=True, timeout=240, capture_output=True,
    )  # fmt: skip
    (wheel,) = dist.glob("dspyrt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
    assert top_level == {"dspyrt", wheel.name.removesuffix("-py3-none-any.whl") + ".dist-info"}

    venv = tmp_path / "venv"
    subprocess.run([installer, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    subprocess.run(
        [installer, "pip", "install", "--offline", "--quiet", "--python", str(python), str(wheel), "openai-agents"],
        check=True, timeout=240, capture_output=True,
    )  # fmt: skip
    code = (
        "import importlib.util as u, agents, dspyrt, dspyrt.agents, dspyrt.agents.loop.cycle\n"
        "from dspyrt import Agent, Client\n"
        "assert agents.__file__ != dspyrt.agents.__file__\n"
        "assert hasattr(agents, 'Runner'), 'import agents is openai-agents'\n"
        "assert u.find_spec('bus') is None and u.find_spec('runtime') is None\n"
        "print(dspyrt.agents.__file__)\n"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert str(venv) in done.stdout
