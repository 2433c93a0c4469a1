"""The optimize and cycle requests share one definition (``OptimizationSpec``) and still take exactly the JSON they
always took; each area's messages live in its ``models`` module.

The pinned tables below were read from the two request classes as they stood before they were composed: a field
added, dropped or given another default changes what users send, and fails here.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from dspyrt.agents.loop.models import CycleRequest
from dspyrt.agents.optimizers.models import OptimizationRequest, OptimizationSpec

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
CYCLE = json.loads((ROOT / "examples" / "cycle.json").read_text())["input"]
OPTIMIZE = json.loads((ROOT / "examples" / "optimize.json").read_text())["input"]
REQUIRED = "required"

CYCLE_FIELDS: dict[str, Any] = {
    "program_name": REQUIRED,
    "program": REQUIRED,
    "trainset": REQUIRED,
    "valset": None,
    "devset": REQUIRED,
    "input_fields": None,
    "metric": "exact_match",
    "metric_field": None,
    "metric_params": {},
    "optimizer": None,
    "params": {},
    "model": None,
    "budget": {"max_lm_calls": None, "max_cost": None},
    "seed": 0,
    "objectives": {
        "min_improvement": None,
        "min_score": None,
        "max_cost": None,
        "max_latency_p95_ms": None,
        "required_validators": [],
        "min_coverage": 1.0,
        "allow_mixed_models": False,
    },
    "validation": {"output_schema": {}, "invariants": [], "code_fields": [], "types": None},
    "canary_fraction": None,
    "shard_size": 25,
    "allow_fallback": True,
    "no_cache": False,
    "max_error_rate": 0.02,
    "include_feedback": False,
}

OPTIMIZE_FIELDS: dict[str, Any] = {
    "program": REQUIRED,
    "program_name": None,
    "trainset": REQUIRED,
    "valset": None,
    "val_fraction": 0.3,
    "input_fields": None,
    "metric": "exact_match",
    "metric_field": None,
    "metric_params": {},
    "optimizer": None,
    "params": {},
    "model": None,
    "budget": {"max_lm_calls": None, "max_cost": None},
    "seed": 0,
    "num_threads": 4,
    "no_cache": False,
    "allow_fallback": True,
    "max_error_rate": 0.02,
}

# OptimizationRequest.cache_key of examples/optimize.json on "demo/model", computed before the split: a changed key
# would turn every stored optimization into a cache miss after an upgrade.
OPTIMIZE_CACHE_KEY = "06646808248a72ae3b1ee0b5b4eb438c59a1d01a1e6d7c1e0b5174a8b5967c42"


def field_table(model: type[BaseModel]) -> dict[str, Any]:
    """Each field's default as JSON, or ``required``."""
    table: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if info.is_required():
            table[name] = REQUIRED
            continue
        default = info.get_default(call_default_factory=True)
        table[name] = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
    return table


# The example, as the README sends it; as the loop tests send it (no required validators); with datasets.
CYCLE_INPUTS = {
    "example": CYCLE,
    "tests": {**CYCLE, "objectives": {**CYCLE["objectives"], "required_validators": []}},
    "datasets": {**CYCLE, "devset": "dataset:dev", "trainset": ["dataset:a", "dataset:b@1a2b3c4d5e6f"],
                 "include_feedback": True, "budget": {"max_lm_calls": 50}, "no_cache": True},
}  # fmt: skip


def test_a_cycle_request_has_the_fields_and_defaults_it_always_had() -> None:
    assert field_table(CycleRequest) == CYCLE_FIELDS


def test_an_optimize_request_has_the_fields_and_defaults_it_always_had() -> None:
    assert field_table(OptimizationRequest) == OPTIMIZE_FIELDS


@pytest.mark.parametrize("variant", sorted(CYCLE_INPUTS))
def test_cycle_inputs_validate_to_the_values_sent_and_the_defaults(variant: str) -> None:
    sent = CYCLE_INPUTS[variant]
    dumped = CycleRequest.model_validate(json.loads(json.dumps(sent))).model_dump(mode="json")
    for name, value in dumped.items():
        if name == "program":  # parsed into a ProgramSpec: what was sent is kept, its own defaults come beside it
            assert {key: value[key] for key in sent["program"]} == sent["program"]
        elif name in sent:
            expected = sent[name]
            if isinstance(expected, dict) and isinstance(CYCLE_FIELDS[name], dict):
                expected = {**CYCLE_FIELDS[name], **expected}  # a nested model's unsent fields take their defaults
            assert value == expected, name
        else:
            assert value == CYCLE_FIELDS[name], name


def test_a_cycle_request_refuses_what_it_always_refused() -> None:
    for change in (
        {"val_fraction": 0.5},  # the optimize task's own fields are not a cycle's
        {"num_threads": 8},
        {"nope": 1},
        {"program_name": "has a space"},
        {"max_error_rate": 0.6},
        {"shard_size": 0},
        {"canary_fraction": 1},
    ):
        with pytest.raises(ValidationError):
            CycleRequest.model_validate({**CYCLE, **change})
    without_name = {key: value for key, value in CYCLE.items() if key != "program_name"}
    with pytest.raises(ValidationError) as raised:
        CycleRequest.model_validate(without_name)
    assert [error["loc"] for error in raised.value.errors()] == [("program_name",)]
    with pytest.raises(ValidationError):
        OptimizationRequest.model_validate({**OPTIMIZE, "devset": CYCLE["devset"]})


def test_the_optimize_cache_key_is_unchanged() -> None:
    assert OptimizationRequest.model_validate(OPTIMIZE).cache_key("demo/model") == OPTIMIZE_CACHE_KEY


def test_the_shared_fields_have_one_definition() -> None:
    for name, info in OptimizationSpec.model_fields.items():
        assert repr(CycleRequest.model_fields[name]) == repr(info), name
        assert repr(OptimizationRequest.model_fields[name]) == repr(info), name


def test_an_optimize_request_from_a_cycle_carries_every_shared_value() -> None:
    cycle = CycleRequest.model_validate(CYCLE_INPUTS["datasets"])
    request = OptimizationRequest.from_spec(cycle, program_name=cycle.program_name, model="demo/model")
    for name in OptimizationSpec.model_fields:
        expected = "demo/model" if name == "model" else getattr(cycle, name)
        assert getattr(request, name) == expected, name
    assert request.program_name == cycle.program_name
    assert (request.val_fraction, request.num_threads) == (0.3, 4)
    with pytest.raises(ValidationError):  # a cycle-only field is not an optimize request's
        OptimizationRequest.from_spec(cycle, devset=CYCLE["devset"])


@pytest.mark.parametrize(
    "module",
    [
        "dspyrt.agents.switcher.core",
        "dspyrt.agents.switcher.agent",
        "dspyrt.agents.switcher.caller",
        "dspyrt.agents.optimizers.core",
        "dspyrt.agents.optimizers.agent",
    ],
)
def test_an_areas_messages_live_in_its_models_module(module: str) -> None:
    loaded = importlib.import_module(module)
    defined = [
        name
        for name, value in vars(loaded).items()
        if inspect.isclass(value) and value.__module__ == module and issubclass(value, BaseModel)
    ]
    assert defined == []
