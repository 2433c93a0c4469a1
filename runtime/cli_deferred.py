"""Imports a dependency makes at start but few commands use, deferred to their first use.

nats-py imports aiohttp for its WebSocket transport alone (ws:// URLs); importing it costs a CLI command about a
fifth of a second. ``defer_imports`` puts a stand-in in ``sys.modules`` that imports the real module when one of its
attributes is first used. Commands that run agents (which use aiohttp through DSPy's LM clients) import everything
as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from typing import Any

DEFERRED_IMPORTS = ("aiohttp",)


class _DeferredModule(types.ModuleType):
    """Stands in ``sys.modules`` for a module until one of its attributes is used, then imports it and answers
    from it. It has the real module's ``__spec__`` (what ``import`` reads of a module it finds in ``sys.modules``)
    and nothing else of it, so every other attribute goes through ``__getattr__``, which imports the module (once:
    the real one then replaces the stand-in in ``sys.modules``)."""

    def __init__(self, spec: ModuleSpec) -> None:
        super().__init__(spec.name)
        self.__spec__ = spec

    def __getattr__(self, attr: str) -> Any:
        module = sys.modules.get(self.__name__)
        if module is self or module is None:
            sys.modules.pop(self.__name__, None)
            module = importlib.import_module(self.__name__)
        return getattr(module, attr)


def defer_imports(argv: Sequence[str], *, agent_commands: frozenset[str]) -> None:
    """Defer DEFERRED_IMPORTS unless the command (the first argument that is not an option) is one of
    ``agent_commands``, the commands that run agents."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command in agent_commands:
        return
    for name in DEFERRED_IMPORTS:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is not None:
            sys.modules[name] = _DeferredModule(spec)
