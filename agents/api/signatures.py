"""What a DSPy user holds, turned into what crosses the bus: programs into :class:`ProgramSpec`, examples into rows.

No code travels. A ``dspy.Signature`` class becomes the declarative spec of its fields (names, roles, types,
descriptions) and instructions; a field whose type the spec cannot express (anything outside ``str``, ``int``,
``float``, ``bool``, ``list[str]``) is refused with :class:`SignatureNotSupported` naming the field and the type,
before anything is submitted. (Field prefixes are not carried: DSPy ignores them.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

import dspy
from pydantic import BaseModel, ValidationError

from dspyrt.agents.api.errors import SignatureNotSupported
from dspyrt.agents.programs import FIELD_TYPES, ModuleKind, ProgramSpec, build_program, parse_program_spec
from dspyrt.bus.errors import FieldError, MessageValidationError
from dspyrt.bus.messages import field_errors_of
from dspyrt.runtime.datasets import is_reference

ProgramLike: TypeAlias = "type[dspy.Signature] | str | Mapping[str, Any] | ProgramSpec"
"""A ``dspy.Signature`` subclass, a signature string (``"question -> answer"``), a declarative spec (a dict or a
:class:`ProgramSpec`), or the name of a program registered under the ``dspyrt.programs`` entry points."""

ExamplesLike: TypeAlias = "Iterable[dspy.Example | Mapping[str, Any]] | str | list[str]"
"""``dspy.Example``s (their input keys are kept), dicts, ``"dataset:NAME[@VERSION]"`` or a list of such references."""


def program_spec(
    program: ProgramLike, *, module: ModuleKind | None = None, instructions: str | None = None
) -> ProgramSpec:
    """The declarative spec of ``program`` (see :data:`ProgramLike`); ``module`` (``"Predict"``,
    ``"ChainOfThought"``) and ``instructions`` override the spec's own."""
    overrides: dict[str, Any] = {}
    if module is not None:
        overrides["module"] = module
    if instructions is not None:
        overrides["instructions"] = instructions
    if isinstance(program, type) and issubclass(program, dspy.Signature):
        return _from_signature(program, overrides)
    if isinstance(program, ProgramSpec):
        data: dict[str, Any] = program.model_dump(mode="json", exclude_unset=True)
    elif isinstance(program, str):
        # A signature has an arrow; anything else names a registered program.
        data = {"signature": program} if "->" in program else {"registered": program}
    elif isinstance(program, Mapping):
        data = dict(program)
    else:
        raise MessageValidationError(
            f"program: expected a dspy.Signature class, a signature string, a spec or a registered program's name, "
            f"got {type(program).__name__}",
            [FieldError(loc="program", message=f"unsupported program type {type(program).__name__}")],
        )
    return parse_program_spec({**data, **overrides})


def _from_signature(signature: type[dspy.Signature], overrides: dict[str, Any]) -> ProgramSpec:
    problems: list[FieldError] = []
    fields: list[dict[str, Any]] = []
    for name, info in signature.fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        type_name = next((key for key, value in FIELD_TYPES.items() if info.annotation == value), None)
        if type_name is None:
            problems.append(
                FieldError(
                    loc=name,
                    message=f"type {_type_label(info.annotation)} cannot be expressed in a program spec "
                    f"(allowed: {', '.join(FIELD_TYPES)})",
                    type="unsupported_type",
                )
            )
            continue
        description = str(extra.get("desc") or "")
        if description == f"${{{name}}}":  # DSPy's placeholder for a field declared without a description
            description = ""
        fields.append({"name": name, "role": extra.get("__dspy_field_type"), "type": type_name,
                       "description": description})  # fmt: skip
    if problems:
        raise _unsupported(signature, problems)
    spec = _spec_of_fields(fields, overrides)
    if "instructions" not in overrides:
        # Send instructions only when they are not the default ones the agents would generate themselves.
        rebuilt = _signature_of(spec)
        if rebuilt.instructions != signature.instructions:
            spec = parse_program_spec({**spec.model_dump(mode="json", exclude_unset=True),
                                       "instructions": signature.instructions})  # fmt: skip
    return spec


def _spec_of_fields(fields: list[dict[str, Any]], overrides: dict[str, Any]) -> ProgramSpec:
    """The shortest spec of ``fields``: a signature string when no field has a description and the inputs come first
    (the same spec, and program hash, as the string a user would write), else the list of fields."""
    roles = [f["role"] for f in fields]
    if not any(f["description"] for f in fields) and roles == sorted(roles, key=lambda r: r != "input"):

        def side(role: str) -> str:
            return ", ".join(
                f["name"] if f["type"] == "str" else f"{f['name']}: {f['type']}" for f in fields if f["role"] == role
            )

        return parse_program_spec({"signature": f"{side('input')} -> {side('output')}", **overrides})
    return parse_program_spec(
        {"fields": [{k: v for k, v in f.items() if k != "description" or v} for f in fields], **overrides}
    )


def _signature_of(spec: ProgramSpec) -> Any:
    program = build_program(spec)
    return program.predict.signature if spec.module == "ChainOfThought" else program.signature


def _unsupported(signature: type[dspy.Signature], problems: list[FieldError]) -> SignatureNotSupported:
    listed = "; ".join(f"field {p.loc!r}: {p.message}" for p in problems)
    return SignatureNotSupported(f"signature {signature.__name__} cannot be sent to the service: {listed}", problems)


def _type_label(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


# ------------------------------------------------------------------------------------------------ examples


def example_rows(examples: ExamplesLike, what: str) -> tuple[list[dict[str, Any]] | str | list[str], list[str] | None]:
    """``examples`` as a task field takes them (rows, or dataset references as they are), and the input keys the
    ``dspy.Example``s among them declare (``with_inputs``), or ``None`` when none does."""
    if isinstance(examples, str):
        return examples, None
    items = list(examples)
    if items and all(is_reference(item) for item in items):
        return [str(item) for item in items], None
    rows: list[dict[str, Any]] = []
    inputs: list[str] | None = None
    for i, item in enumerate(items):
        if isinstance(item, dspy.Example):
            rows.append(dict(item.toDict()))
            try:
                keys = list(item.inputs().keys())
            except ValueError:  # an Example without with_inputs(): the program's input fields apply
                continue
            if inputs is None:
                inputs = keys
            elif set(keys) != set(inputs):
                raise MessageValidationError(
                    f"{what}[{i}] has input keys {sorted(keys)}, where earlier examples have {sorted(inputs)}",
                    [FieldError(loc=f"{what}.{i}", message="input keys differ from the other examples")],
                )
        elif isinstance(item, Mapping):
            rows.append(dict(item))
        else:
            raise MessageValidationError(
                f"{what}[{i}] is a {type(item).__name__}: examples are dspy.Examples, dicts, or dataset references",
                [FieldError(loc=f"{what}.{i}", message=f"unsupported example type {type(item).__name__}")],
            )
    return rows, inputs


def merged_inputs(*declared: list[str] | None) -> list[str] | None:
    """The input keys several example sets declare: one list, or ``None`` when none declares any; sets that
    disagree are refused."""
    found = [keys for keys in declared if keys is not None]
    if any(set(keys) != set(found[0]) for keys in found[1:]):
        raise MessageValidationError(f"the example sets declare different input keys: {found}")
    return found[0] if found else None


def build_request(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    """``model`` validated from ``fields``; a :class:`MessageValidationError` lists every problem, before anything
    is sent."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        errors = field_errors_of(exc)
        summary = "; ".join(f"{e.loc}: {e.message}" for e in errors) or f"{exc.error_count()} errors"
        raise MessageValidationError(f"invalid {model.__name__}: {summary}", errors) from None
