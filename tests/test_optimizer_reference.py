"""The optimizer reference is generated from the optimizers' parameter models, and ``dspyrt optimizers`` shows it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

import dspyrt.agents.optimizers.reference as reference_module
from dspyrt.agents.optimizers.builtin import (
    BUILTIN_OPTIMIZERS,
    BootstrapParams,
    CoproParams,
    GepaParams,
    LabeledFewShotParams,
    MiproParams,
    RandomSearchParams,
    SimbaParams,
)
from dspyrt.agents.optimizers.reference import OptimizerDoc, optimizer_reference, params_model_of, reference_markdown

pytestmark = pytest.mark.timeout(60)

DSPYRT = Path(sys.executable).parent / "dspyrt"

PARAMS_MODELS: dict[str, type[BaseModel]] = {
    "labeled_fewshot": LabeledFewShotParams,
    "bootstrap_fewshot": BootstrapParams,
    "random_search": RandomSearchParams,
    "mipro_v2": MiproParams,
    "copro": CoproParams,
    "simba": SimbaParams,
    "gepa": GepaParams,
}

WRAPS = {
    "labeled_fewshot": "dspy.LabeledFewShot",
    "bootstrap_fewshot": "dspy.BootstrapFewShot",
    "random_search": "dspy.BootstrapFewShotWithRandomSearch",
    "mipro_v2": "dspy.MIPROv2",
    "copro": "dspy.COPRO",
    "simba": "dspy.SIMBA",
    "gepa": "dspy.GEPA",
}


def by_name(docs: list[OptimizerDoc]) -> dict[str, OptimizerDoc]:
    return {doc.name: doc for doc in docs}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DSPYRT), *args], capture_output=True, text=True, timeout=60, check=False)


# ------------------------------------------------------------------------------------------- the models


def test_the_public_surface_is_pinned() -> None:
    assert reference_module.__all__ == [
        "OptimizerDoc",
        "ParameterDoc",
        "optimizer_reference",
        "params_model_of",
        "reference_markdown",
    ]


def test_every_built_in_optimizer_has_every_field_of_its_params_model() -> None:
    assert set(PARAMS_MODELS) == set(BUILTIN_OPTIMIZERS)  # a new built-in needs a line above
    docs = by_name(optimizer_reference())
    for name, factory in BUILTIN_OPTIMIZERS.items():
        model = PARAMS_MODELS[name]
        assert params_model_of(factory) is model
        doc = docs[name]
        assert doc.params_model == f"dspyrt.agents.optimizers.builtin.{model.__name__}"
        assert doc.wraps == WRAPS[name]
        assert doc.description.startswith(WRAPS[name])
        assert doc.parameters is not None
        assert [p.name for p in doc.parameters] == list(model.model_fields), name


def test_the_defaults_shown_are_the_models_defaults() -> None:
    for doc in optimizer_reference(BUILTIN_OPTIMIZERS):
        model = PARAMS_MODELS[doc.name]
        assert doc.parameters is not None
        assert not any(p.required for p in doc.parameters)
        # Sending every default explicitly, as JSON, is the same as sending nothing.
        explicit = model.model_validate(json.loads(json.dumps({p.name: p.default for p in doc.parameters})))
        assert explicit == model()


def test_known_types_defaults_and_constraints() -> None:
    docs = by_name(optimizer_reference(BUILTIN_OPTIMIZERS))
    params = {name: {p.name: p for p in doc.parameters or []} for name, doc in docs.items()}

    k = params["labeled_fewshot"]["k"]
    assert (k.type, k.default, k.default_text(), k.constraints) == ("int", 16, "16", ">= 1, <= 1000")
    assert params["labeled_fewshot"]["sample"].constraints == ""

    auto = params["mipro_v2"]["auto"]
    assert auto.type == "'light' | 'medium' | 'heavy' | None"
    assert (auto.default, auto.default_text()) == ("light", "'light'")
    assert params["mipro_v2"]["num_trials"].type == "int | None"
    assert params["mipro_v2"]["num_trials"].constraints == ">= 1, <= 500"
    assert params["mipro_v2"]["minibatch_size"].constraints == ">= 1"

    threshold = params["bootstrap_fewshot"]["metric_threshold"]
    assert (threshold.type, threshold.default, threshold.default_text()) == ("float | None", None, "None")
    assert params["copro"]["init_temperature"].type == "float"
    assert params["copro"]["init_temperature"].constraints == ">= 0, <= 2"
    assert params["gepa"]["auto"].type == "'light' | 'medium' | 'heavy' | None"
    assert docs["gepa"].summary == "DSPy's GEPA; the run's own LM doubles as the reflection LM."
    assert docs["copro"].summary == ""


# ------------------------------------------------------------------------------- third-party optimizers


class PluginParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(gt=0, lt=2, description="sampling temperature")
    tags: list[str] = Field(default_factory=list, max_length=8)
    mode: Annotated[Literal["a", "b"], Field(description="which one")] = "a"
    seed_name: str | None = Field(default=None, pattern=r"^[a-z]+$")
    limit: Annotated[int, Field(ge=1)] | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class PluginOptimizer:
    """A plugin that needs a parameter, so it declares its model instead.

    Only the first paragraph is the summary.
    """

    params_model: ClassVar[type[BaseModel]] = PluginParams

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = PluginParams.model_validate(params or {})

    def compile(self, ctx: Any) -> Any:
        return ctx.student


def bare_factory(params: dict[str, Any]) -> Any:
    return object()


def test_a_plugin_that_declares_its_model_is_documented_from_it() -> None:
    docs = by_name(optimizer_reference({"plugin": PluginOptimizer, "bare": bare_factory}))
    plugin = docs["plugin"]
    assert plugin.wraps is None
    assert plugin.summary == "A plugin that needs a parameter, so it declares its model instead."
    assert plugin.description == plugin.summary
    assert plugin.params_model is not None and plugin.params_model.endswith("PluginParams")
    assert plugin.parameters is not None
    p = {param.name: param for param in plugin.parameters}
    assert list(p) == list(PluginParams.model_fields)
    assert (p["temperature"].required, p["temperature"].default_text(), p["temperature"].constraints) == (
        True,
        "required",
        "> 0, < 2",
    )
    assert p["temperature"].description == "sampling temperature"
    assert (p["tags"].type, p["tags"].default, p["tags"].constraints) == ("list[str]", [], "length <= 8")
    assert (p["mode"].type, p["mode"].description) == ("'a' | 'b'", "which one")
    assert (p["seed_name"].type, p["seed_name"].constraints) == ("str | None", "matches ^[a-z]+$")
    assert (p["limit"].type, p["limit"].constraints) == ("int | None", ">= 1")
    assert p["extra"].type == "dict[str, Any]"

    bare = docs["bare"]
    assert (bare.parameters, bare.params_model, bare.wraps, bare.summary) == (None, None, None, "")


def test_markdown_has_one_table_per_optimizer() -> None:
    text = reference_markdown(optimizer_reference())
    assert "| `k` | `int` | `16` | >= 1, <= 1000 |" in text
    # A pipe inside a cell is escaped, or it would split the row.
    assert "| `auto` | `'light' \\| 'medium' \\| 'heavy' \\| None` | `'light'` |  |" in text
    for name in BUILTIN_OPTIMIZERS:
        assert f"#### `{name}`" in text
    assert text.count("| parameter | type | default | constraints |") == len(BUILTIN_OPTIMIZERS)
    assert "Wraps `dspy.MIPROv2`." in text

    plugin = reference_markdown(optimizer_reference({"plugin": PluginOptimizer, "bare": bare_factory}), 3)
    assert "### `plugin`" in plugin
    assert "| parameter | type | default | constraints | description |" in plugin
    assert "| `temperature` | `float` | required | > 0, < 2 | sampling temperature |" in plugin
    assert "Parameters: not published (no params model)." in plugin


# ------------------------------------------------------------------------------------------------ CLI


def test_dspyrt_optimizers_json_runs_without_nats() -> None:
    proc = run_cli("optimizers", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    docs = {doc["name"]: doc for doc in data["optimizers"]}
    assert set(BUILTIN_OPTIMIZERS) <= set(docs)
    for name, model in PARAMS_MODELS.items():
        assert [p["name"] for p in docs[name]["parameters"]] == list(model.model_fields)
        assert docs[name]["wraps"] == WRAPS[name]
    k = docs["labeled_fewshot"]["parameters"][0]
    assert k == {
        "name": "k",
        "type": "int",
        "required": False,
        "default": 16,
        "constraints": ">= 1, <= 1000",
        "description": None,
    }


def test_dspyrt_optimizers_prints_a_table_per_optimizer() -> None:
    proc = run_cli("optimizers")
    assert proc.returncode == 0, proc.stderr
    for name, wraps in WRAPS.items():
        assert name in proc.stdout
        assert wraps in proc.stdout
    assert ">= 1, <= 1000" in proc.stdout


def test_a_bad_configuration_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_cli("optimizers", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2
    assert "no such file" in proc.stderr
    assert proc.stdout == ""


def test_the_readme_reference_is_the_generated_one() -> None:
    """The README's optimizer parameter tables are this generator's output: regenerate them when a model changes."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    docs = [d for d in optimizer_reference() if d.name in BUILTIN_OPTIMIZERS]
    assert reference_markdown(docs).strip() in readme
