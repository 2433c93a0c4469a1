"""What an optimizer is, built-in (``dspyrt.agents.optimizers.builtin``) or a plugin from the entry-point group
``dspyrt.optimizers``: a factory that takes one run's parameters and returns an object whose ``compile`` turns the
student program into the optimized one.

The guide writes plugins another way: a class taking a config dict, with ``optimize(program, test_data, metric)``
(or ``optimize(program, test_data)``, its "Plugin Architecture"). :func:`optimizer_factory` adapts those at
registration, and refuses anything with neither method there, so a plugin never registers and then fails at run
time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dspyrt.agents.metrics import Metric
from dspyrt.bus import ConfigurationError

EXPECTED_INTERFACE = (
    "compile(ctx: CompileContext) -> program, or the guide's optimize(program, test_data, metric) "
    "(optimize(program, test_data) without a metric)"
)


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


class GuideOptimizerAdapter:
    """A guide-style optimizer (``optimize(program, test_data[, metric])``) behind the ``Optimizer`` protocol.

    ``optimize`` gets the student program, the trainset (``dspy.Example``s) and, when it takes one, the metric.
    What it returns is the optimized program when it has ``forward``; anything else (the guide returns an
    ``OptimizationResult``, or ``None``) means it optimized the student in place, which is then the result."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self._with_metric = _takes_metric(target.optimize)

    def compile(self, ctx: CompileContext) -> Any:
        if self._with_metric:
            returned = self.target.optimize(ctx.student, ctx.trainset, ctx.metric)
        else:
            returned = self.target.optimize(ctx.student, ctx.trainset)
        return returned if callable(getattr(returned, "forward", None)) else ctx.student


def optimizer_factory(target: Any, label: str = "optimizer") -> OptimizerFactory:
    """The factory of ``target``: an optimizer class (called with the run's params) or a ready optimizer object,
    with ``compile(ctx)`` or the guide's ``optimize(...)``. A class or an object with neither method is refused
    here (:class:`ConfigurationError` naming the interface); a plain factory function is checked on what it
    returns, when a run prepares (before anything is spent)."""
    if isinstance(target, type) or not callable(target):
        _kind(target, label)  # a class or an object: checked now
    if not isinstance(target, type) and (_has(target, "compile") or _has(target, "optimize")):
        ready = target  # one object for every run: it takes no per-run params

        def shared(params: dict[str, Any]) -> Optimizer:
            if params:
                raise ConfigurationError(f"{label} is a ready object: it takes no params (given {sorted(params)})")
            return as_optimizer(ready, label)

        return shared
    factory: Callable[[dict[str, Any]], Any] = target

    def build(params: dict[str, Any]) -> Optimizer:
        return as_optimizer(factory(params), label)

    return build


def as_optimizer(candidate: Any, label: str = "optimizer") -> Optimizer:
    """``candidate`` as an :class:`Optimizer`: itself when it has ``compile``, adapted when it has the guide's
    ``optimize``; otherwise :class:`ConfigurationError` naming the expected interface."""
    if _kind(candidate, label) == "compile":
        optimizer: Optimizer = candidate
        return optimizer
    return GuideOptimizerAdapter(candidate)


def _kind(candidate: Any, label: str) -> str:
    if _has(candidate, "compile"):
        return "compile"
    if _has(candidate, "optimize"):
        return "optimize"
    what = candidate.__name__ if isinstance(candidate, type) else type(candidate).__name__
    raise ConfigurationError(f"{label} {what} is not an optimizer: it needs {EXPECTED_INTERFACE}")


def _has(candidate: Any, method: str) -> bool:
    return callable(getattr(candidate, method, None))


def _takes_metric(method: Any) -> bool:
    """Whether ``optimize`` takes a third argument (the metric) beside the program and the data."""
    try:
        parameters = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3
