"""A reference of every installed optimizer's parameters, generated from the optimizers' own pydantic models.

Nothing here is a hand-kept table: the optimizers come from ``DSPyOptimizerManager`` (built-ins plus the
``dspyrt.optimizers`` entry points, by the manager's own rule), each one's parameters from its params model's
``model_fields`` (type, default, ``ge``/``gt``/``le``/``lt`` and length/pattern constraints, description), and the
DSPy class it wraps from the names its ``compile`` uses. A new field, bound or optimizer shows up by itself.

How an optimizer's params model is found, first match wins:

1. the factory's ``params_model`` attribute (a pydantic model class), for a plugin that wants to say it;
2. the type of ``factory({}).params`` when that is a pydantic model, as the built-ins do (``{}`` is what a
   request without ``params`` gives the factory, so this is an ordinary call).

An optimizer with neither has ``parameters=None`` (unknown), as opposed to ``[]`` (takes no parameters).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, TypeGuard, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo
from pydantic_core import PydanticSerializationError, to_jsonable_python

from dspyrt.agents.optimizers.protocol import OptimizerFactory

__all__ = ["OptimizerDoc", "ParameterDoc", "optimizer_reference", "params_model_of", "reference_markdown"]


class ParameterDoc(BaseModel):
    """One parameter of an optimizer, as its params model declares it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    type: str
    required: bool = False
    # The default as JSON (what a request would send); meaningless when ``required``.
    default: Any = None
    constraints: str = ""
    description: str | None = None

    def default_text(self) -> str:
        """The default as it reads in Python (``None``, ``True``, ``'light'``), or ``required``."""
        return "required" if self.required else repr(self.default)


class OptimizerDoc(BaseModel):
    """One optimizer: its name, the DSPy class it wraps, a one-line description and its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    # e.g. "dspy.LabeledFewShot"; None when the compile step names no DSPy teleprompter.
    wraps: str | None = None
    # The first paragraph of the optimizer's own docstring, on one line ("" without one).
    summary: str = ""
    # The wrapped class and the summary on one line, e.g. "dspy.GEPA — DSPy's GEPA; the run's own LM doubles as ...".
    description: str = ""
    # Qualified name of the params model; None when none was found (and then ``parameters`` is None).
    params_model: str | None = None
    parameters: list[ParameterDoc] | None = None


def optimizer_reference(optimizers: Mapping[str, OptimizerFactory] | None = None) -> list[OptimizerDoc]:
    """Every optimizer of ``optimizers`` (default: the installed ones, as the optimizer agent sees them)."""
    if optimizers is None:
        from dspyrt.agents.metrics import MetricRegistry
        from dspyrt.agents.optimizers.core import DSPyOptimizerManager

        # The manager's own list (built-ins, then entry points it does not shadow); an empty metric registry so
        # that listing optimizers does not also load every metric plugin.
        optimizers = DSPyOptimizerManager(metrics=MetricRegistry()).optimizers
    return [_describe(name, factory) for name, factory in optimizers.items()]


def params_model_of(factory: OptimizerFactory) -> type[BaseModel] | None:
    """The pydantic model an optimizer validates its parameters with, or None if it exposes none."""
    model, _ = _inspect(factory)
    return model


def reference_markdown(docs: Iterable[OptimizerDoc], heading_level: int = 4) -> str:
    """One Markdown section per optimizer: a heading, what it wraps, and a table of its parameters."""
    hashes = "#" * heading_level
    parts: list[str] = []
    for doc in docs:
        lines = [f"{hashes} `{doc.name}`", ""]
        if doc.description:
            wraps = f"Wraps `{doc.wraps}`." if doc.wraps else ""
            lines += [" ".join(p for p in (wraps, doc.summary) if p), ""]
        if doc.parameters is None:
            lines.append("Parameters: not published (no params model).")
        elif not doc.parameters:
            lines.append("No parameters.")
        else:
            described = any(p.description for p in doc.parameters)
            head = ["parameter", "type", "default", "constraints"] + (["description"] if described else [])
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for p in doc.parameters:
                row = [f"`{p.name}`", f"`{p.type}`", p.default_text() if p.required else f"`{p.default_text()}`"]
                row += [p.constraints] + ([p.description or ""] if described else [])
                lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------ internals


def _describe(name: str, factory: OptimizerFactory) -> OptimizerDoc:
    model, instance = _inspect(factory)
    compile_fn = getattr(type(instance) if instance is not None else factory, "compile", None)
    wraps = _wrapped_teleprompters(compile_fn) if callable(compile_fn) else []
    summary = _summary(factory)
    wraps_text = ", ".join(wraps) or None
    return OptimizerDoc(
        name=name,
        wraps=wraps_text,
        summary=summary,
        description=" — ".join(p for p in (wraps_text, summary) if p),
        params_model=f"{model.__module__}.{model.__qualname__}" if model is not None else None,
        parameters=[_parameter(n, f) for n, f in model.model_fields.items()] if model is not None else None,
    )


def _inspect(factory: OptimizerFactory) -> tuple[type[BaseModel] | None, Any]:
    """(params model, an instance made with no parameters); either may be None."""
    declared = getattr(factory, "params_model", None)
    try:
        instance: Any = factory({})
    except Exception:  # a plugin that insists on parameters: it may still have declared its model
        instance = None
    if _is_model(declared):
        return declared, instance
    params = getattr(instance, "params", None)
    return (type(params) if isinstance(params, BaseModel) else None), instance


def _is_model(value: object) -> TypeGuard[type[BaseModel]]:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _summary(factory: OptimizerFactory) -> str:
    doc = getattr(factory, "__doc__", None)  # a class's own docstring: __doc__ is not inherited
    if not isinstance(doc, str) or not doc.strip():
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n", 1)[0].split())


def _wrapped_teleprompters(fn: Any) -> list[str]:
    """The DSPy teleprompter classes ``fn`` names (``dspy.X`` or an imported ``X``), e.g. ``["dspy.MIPROv2"]``."""
    import dspy
    from dspy.teleprompt import Teleprompter

    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    scope: dict[str, Any] = getattr(fn, "__globals__", {})
    found: list[str] = []
    for name in _names(code):
        candidates: tuple[object, object] = (getattr(dspy, name, None), scope.get(name))
        for candidate in candidates:
            if not isinstance(candidate, type) or candidate is Teleprompter or not issubclass(candidate, Teleprompter):
                continue
            public = getattr(dspy, candidate.__name__, None) is candidate
            label = f"dspy.{candidate.__name__}" if public else f"{candidate.__module__}.{candidate.__qualname__}"
            if label not in found:
                found.append(label)
    return found


def _names(code: types.CodeType) -> list[str]:
    """Global and attribute names a function's code uses, nested functions included, in order."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _names(const)
    return names


def _parameter(name: str, field: FieldInfo) -> ParameterDoc:
    required = field.is_required()
    return ParameterDoc(
        name=field.alias or name,
        type=_type_text(field.annotation),
        required=required,
        default=None if required else _jsonable(field.get_default(call_default_factory=True, validated_data={})),
        constraints=_constraints([*field.metadata, *_annotated_metadata(field.annotation)]),
        description=field.description,
    )


def _jsonable(value: Any) -> Any:
    try:
        return to_jsonable_python(value)
    except PydanticSerializationError:
        return repr(value)


def _type_text(tp: Any) -> str:
    """A readable type: ``int``, ``float | None``, ``'light' | 'medium' | 'heavy' | None``, ``dict[str, Any]``."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_text(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return " | ".join(_type_text(arg) for arg in get_args(tp))
    if origin is Literal:
        return " | ".join("None" if arg is None else repr(arg) for arg in get_args(tp))
    if tp is None or tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    if origin is not None:
        args = ", ".join("..." if arg is Ellipsis else _type_text(arg) for arg in get_args(tp))
        base = getattr(origin, "__name__", str(origin).removeprefix("typing."))
        return f"{base}[{args}]" if args else base
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).removeprefix("typing.")


def _annotated_metadata(tp: Any) -> list[Any]:
    """Constraints written into the type (``Annotated[int, Field(ge=1)] | None``) rather than on the field."""
    origin = get_origin(tp)
    if origin is Annotated:
        extra = get_args(tp)[1:]
        return [m for item in extra for m in (item.metadata if isinstance(item, FieldInfo) else [item])]
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(tp) for m in _annotated_metadata(arg)]
    return []


# (attribute of a constraint object, how it reads), in the order they are shown: lower bounds, upper bounds, rest.
_CONSTRAINTS = (
    ("gt", "> {}"),
    ("ge", ">= {}"),
    ("lt", "< {}"),
    ("le", "<= {}"),
    ("multiple_of", "multiple of {}"),
    ("min_length", "length >= {}"),
    ("max_length", "length <= {}"),
    ("pattern", "matches {}"),
)


def _constraints(metadata: Iterable[Any]) -> str:
    """``ge``/``gt``/``le``/``lt`` (and length, pattern) constraints as text, e.g. ``>= 1, <= 1000``."""
    items = list(metadata)
    found: list[str] = []
    for attr, text in _CONSTRAINTS:
        for item in items:
            value = getattr(item, attr, None)
            if value is not None:
                found.append(text.format(value))
    return ", ".join(dict.fromkeys(found))


def _cell(text: str) -> str:
    # A pipe ends a Markdown table cell, even inside backticks, unless escaped.
    return text.replace("|", "\\|").replace("\n", " ")
