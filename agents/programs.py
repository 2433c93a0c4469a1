"""Programs by description: a declarative spec, or the name of an installed program class.

A :class:`ProgramSpec` is what crosses the bus. It is either declarative::

    {"signature": "question -> answer", "module": "ChainOfThought", "instructions": "Answer briefly."}
    {"fields": [{"name": "text", "role": "input"}, {"name": "label", "role": "output", "type": "str"}]}

or a reference to a class registered under the entry-point group ``dspyrt.programs``::

    {"registered": "rag"}

Nothing in a spec is executed or imported: field types come from a fixed list (no annotation in a
signature string reaches DSPy's type resolver, which would import modules by name), and a registered name
is looked up only among installed entry points. Program state (demos, instructions) travels as
``Module.dump_state()`` JSON, never as a pickle.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint
from types import MappingProxyType
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import dspy
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dspyrt.bus.errors import ConfigurationError, FieldError, MessageValidationError
from dspyrt.runtime.plugins import EntryPointRegistry

ENTRY_POINT_GROUP = "dspyrt.programs"

FieldType = Literal["str", "int", "float", "bool", "list[str]"]
FIELD_TYPES: Mapping[str, Any] = MappingProxyType(
    {"str": str, "int": int, "float": float, "bool": bool, "list[str]": list[str]}
)
_TYPE_NAMES: Mapping[str, FieldType] = MappingProxyType({name: name for name in get_args(FieldType)})
ModuleKind = Literal["Predict", "ChainOfThought"]
Role = Literal["input", "output"]

# What a Predict's dumped state may hold (Predict.load_state setattr()s every other key it is given).
_PREDICT_STATE_KEYS = frozenset({"traces", "train", "demos", "signature", "fields", "lm"})
_USER_DATA_KEYS = frozenset({"demos", "train", "traces"})
_SECRET_KEYS = frozenset({"api_key", "apikey", "api_secret", "secret", "password", "authorization", "access_token"})


@runtime_checkable
class HasForward(Protocol):
    """Anything that can run as a program: it has ``forward``. ``dspy.Module`` is the usual one."""

    def forward(self, *args: Any, **kwargs: Any) -> Any: ...


class FieldSpec(BaseModel):
    """One signature field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", max_length=64)
    role: Role
    type: FieldType = "str"
    description: str = Field(default="", max_length=2_000)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        _check_field_name(value)
        return value


class ProgramSpec(BaseModel):
    """A program: ``signature`` or ``fields`` (+ ``module``, ``instructions``), or ``registered``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    signature: str | None = Field(default=None, max_length=2_000, description="e.g. 'question -> answer: int'")
    fields: tuple[FieldSpec, ...] | None = None
    module: ModuleKind = "Predict"
    instructions: str | None = Field(default=None, max_length=20_000)
    registered: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)

    @field_validator("signature")
    @classmethod
    def _valid_signature(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = " ".join(value.split())
        _signature_fields(value)
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ProgramSpec:
        given = [k for k in ("signature", "fields", "registered") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of signature, fields or registered")
        if self.registered is not None:
            extra = sorted({"module", "instructions"} & self.model_fields_set)
            if extra:
                raise ValueError(f"a registered program takes no {' or '.join(extra)}")
            return self
        if self.fields is not None:
            _check_fields([(f.name, f.role) for f in self.fields], self.module)
        else:
            _check_fields([(n, r) for n, r, _ in _signature_fields(self.signature or "")], self.module)
        return self


def parse_program_spec(data: Any) -> ProgramSpec:
    """Validate untrusted input into a :class:`ProgramSpec`; a :class:`MessageValidationError` lists every problem."""
    try:
        return ProgramSpec.model_validate(data)
    except ValidationError as exc:
        raise _invalid("invalid program spec", exc) from None


def program_hash(spec: ProgramSpec) -> str:
    """A stable sha256 (hex) of the spec's canonical JSON: defaults filled in, keys sorted, no whitespace."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ProgramRegistry:
    """Program classes by name, from entry points (``dspyrt.programs`` unless given others)."""

    def __init__(self, entries: Iterable[EntryPoint] | None) -> None:
        """``entries``: the programs' entry points (``None``: those installed)."""
        self._targets = EntryPointRegistry(ENTRY_POINT_GROUP, "registered program", _program_target, entries=entries)

    @classmethod
    def installed(cls) -> ProgramRegistry:
        """Every program installed under the ``dspyrt.programs`` entry-point group."""
        return cls(None)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return self._targets.names()

    def create(self, name: str) -> Any:
        """A fresh program for ``name``: the entry point's class or factory called with no arguments."""
        target = self._targets.get(name)
        if isinstance(target, HasForward) and not isinstance(target, type):
            program: Any = copy.deepcopy(target)  # a registered instance: never share its demos between builds
        else:
            try:
                program = target()  # a class or a factory, called with no arguments
            except Exception as exc:
                raise ConfigurationError(f"{self._targets.label(name)} cannot be created: {exc}") from exc
        if not isinstance(program, HasForward):
            raise ConfigurationError(f"{self._targets.label(name)} has no forward method")
        return program if isinstance(program, dspy.Module) else _ForwardModule(program)


def _program_target(loaded: Any) -> Any:
    """What a program entry point may name: a class, a factory, or a program instance (copied for each build)."""
    if (isinstance(loaded, HasForward) and not isinstance(loaded, type)) or callable(loaded):
        return loaded
    raise TypeError("is neither a class, a factory nor a program")


class _ForwardModule(dspy.Module):  # type: ignore[misc]
    """A ``dspy.Module`` around a registered object that only has ``forward``."""

    def __init__(self, target: HasForward) -> None:
        super().__init__()
        self.target = target

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.target.forward(*args, **kwargs)


def build_program(spec: ProgramSpec, *, registry: ProgramRegistry | None = None) -> Any:
    """A fresh ``dspy.Module`` for the spec.

    Registered names are looked up in ``registry``, by default the installed entry points.
    """
    if spec.registered is not None:
        return (registry if registry is not None else ProgramRegistry.installed()).create(spec.registered)
    try:
        signature = (
            dspy.Signature(spec.signature, spec.instructions)
            if spec.signature is not None
            else dspy.Signature(_field_dict(spec.fields or ()), spec.instructions)
        )
    except (TypeError, ValueError, SyntaxError) as exc:
        raise ConfigurationError(f"signature cannot be built: {exc}") from exc
    module_class = dspy.ChainOfThought if spec.module == "ChainOfThought" else dspy.Predict
    return module_class(signature)


def dump_program_state(program: Any) -> dict[str, Any]:
    """``program.dump_state()``, checked to be JSON-able and to carry no credential."""
    state = program.dump_state()
    if not isinstance(state, dict):
        raise ConfigurationError(f"program state must be a JSON object, got {type(state).__name__}")
    try:
        json.dumps(state)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"program state is not JSON-serializable: {exc}") from exc
    leaks = sorted(_secret_paths(state, ""))
    if leaks:
        raise ConfigurationError(f"program state holds credentials at {', '.join(leaks)}; refusing to export it")
    return state


def load_program_state(
    spec: ProgramSpec,
    state: Mapping[str, Any],
    *,
    registry: ProgramRegistry | None = None,
    allow_lm_state: bool = False,
) -> Any:
    """Build the spec's program and restore ``state`` (from :func:`dump_program_state`) into it.

    The state must fit the program: one entry per predictor, only the keys a predictor dumps. A predictor
    LM in the state is refused unless ``allow_lm_state``: which model runs (and costs) is the service's
    choice, not the payload's. Even then, LM state that would import a class (a custom engine) is refused,
    as DSPy refuses it by default.
    """
    program = build_program(spec, registry=registry)
    if not isinstance(state, Mapping):
        raise MessageValidationError(f"program state must be an object, got {type(state).__name__}")
    problems = _state_problems(program, state, allow_lm_state)
    if problems:
        raise MessageValidationError("program state does not fit this program", problems)
    try:
        program.load_state(copy.deepcopy(dict(state)))
    except (KeyError, TypeError, ValueError, IndexError, NotImplementedError) as exc:
        raise MessageValidationError(f"program state cannot be loaded: {exc}") from exc
    return program


def _state_problems(program: Any, state: Mapping[str, Any], allow_lm_state: bool) -> list[FieldError]:
    """Where ``state`` does not have the shape ``program.dump_state()`` would give."""
    if isinstance(program, dspy.Predict):  # a bare predictor dumps its own state, not {name: state}
        return _predictor_problems("", state, allow_lm_state)
    expected = {name for name, _ in program.named_parameters()}
    problems = [FieldError(loc=name, message="missing from state") for name in sorted(expected - set(state))]
    problems += [FieldError(loc=name, message="not a part of this program") for name in sorted(set(state) - expected)]
    for name in sorted(expected & set(state)):
        part = state[name]
        if isinstance(part, Mapping):
            problems += _predictor_problems(f"{name}.", part, allow_lm_state)
        else:
            problems.append(FieldError(loc=name, message="must be an object"))
    return problems


def _predictor_problems(prefix: str, state: Mapping[str, Any], allow_lm_state: bool) -> list[FieldError]:
    problems = [
        FieldError(loc=f"{prefix}{key}", message="unexpected key") for key in sorted(set(state) - _PREDICT_STATE_KEYS)
    ]
    if state.get("lm") is not None and not allow_lm_state:
        problems.append(FieldError(loc=f"{prefix}lm", message="LM settings are chosen by the service, not the state"))
    return problems


def _signature_fields(signature: str) -> list[tuple[str, Role, FieldType]]:
    """Names, roles and types of a ``'a, b: int -> c: list[str]'`` string, checked against the allowed types."""
    if signature.count("->") != 1:
        raise ValueError("signature must have the form 'inputs -> outputs' with exactly one '->'")
    left, right = signature.split("->")
    sides: tuple[tuple[str, Role], ...] = ((left, "input"), (right, "output"))
    found: list[tuple[str, Role, FieldType]] = []
    for side, role in sides:
        for name, annotation in _side_fields(side, role):
            field_type = _TYPE_NAMES.get(annotation or "str")
            if field_type is None:
                raise ValueError(f"field {name!r} has unknown type {annotation!r}; allowed: {', '.join(FIELD_TYPES)}")
            found.append((name, role, field_type))
    return found


def _side_fields(side: str, role: str) -> list[tuple[str, str | None]]:
    if not side.strip():
        raise ValueError(f"signature needs at least one {role} field")
    try:
        tree = ast.parse(f"def f({side}): pass")
    except SyntaxError:
        raise ValueError(f"cannot read the {role} fields {side.strip()!r}: expected 'name' or 'name: type'") from None
    function = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(function, ast.FunctionDef):
        raise ValueError(f"cannot read the {role} fields {side.strip()!r}")
    args = function.args
    if args.posonlyargs or args.vararg or args.kwonlyargs or args.kwarg or args.defaults:
        raise ValueError(f"{role} fields are plain 'name' or 'name: type' entries, separated by commas")
    return [(arg.arg, ast.unparse(arg.annotation) if arg.annotation is not None else None) for arg in args.args]


def _check_field_name(name: str) -> None:
    if name.startswith("model_") or hasattr(dspy.Signature, name):
        raise ValueError(f"field name {name!r} is reserved by dspy.Signature")


def _check_fields(fields: list[tuple[str, Role]], module: ModuleKind) -> None:
    names = [name for name, _ in fields]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate field name(s): {', '.join(duplicates)}")
    for name in names:
        _check_field_name(name)
    roles = {role for _, role in fields}
    if roles != {"input", "output"}:
        raise ValueError("a program needs at least one input and one output field")
    if module == "ChainOfThought" and "reasoning" in names:
        raise ValueError("ChainOfThought adds its own 'reasoning' output; rename that field")


def _field_dict(fields: Iterable[FieldSpec]) -> dict[str, tuple[Any, Any]]:
    result: dict[str, tuple[Any, Any]] = {}
    for field in fields:
        kind = dspy.InputField if field.role == "input" else dspy.OutputField
        info = kind(desc=field.description) if field.description else kind()
        result[field.name] = (FIELD_TYPES[field.type], info)
    return result


def _secret_paths(value: Any, path: str) -> Iterable[str]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in _USER_DATA_KEYS:
                continue  # demos hold the task's own data, where a field may well be called "password"
            if str(key).lower() in _SECRET_KEYS and item:
                yield where
            else:
                yield from _secret_paths(item, where)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _secret_paths(item, f"{path}[{index}]")


def _invalid(message: str, exc: ValidationError) -> MessageValidationError:
    errors = [
        FieldError(loc=".".join(str(p) for p in e["loc"]) or "spec", message=e["msg"], type=e["type"])
        for e in exc.errors()
    ]
    summary = "; ".join(f"{e.loc}: {e.message}" for e in errors)
    return MessageValidationError(f"{message}: {summary}", errors)
