"""What an optimizer is, built-in (``dspyrt.agents.optimizers.builtin``) or a plugin from the entry-point group
``dspyrt.optimizers``: a factory that takes one run's parameters and returns an object whose ``compile`` turns the
student program into the optimized one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dspyrt.agents.metrics import Metric


@dataclass
class CompileContext:
    """Everything an optimizer may use: the student program, the data, the metric and the LM."""

    student: Any
    trainset: list[Any]
    valset: list[Any]
    metric: Metric
    seed: int
    num_threads: int
    lm: Any


class Optimizer(Protocol):
    """An optimizer plugin: validated parameters in, a compiled program out."""

    def compile(self, ctx: CompileContext) -> Any: ...


OptimizerFactory = Callable[[dict[str, Any]], Optimizer]
