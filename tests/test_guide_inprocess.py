"""The implementation guide's classes, in-process and as the guide writes them (modulo import paths): no NATS.

Every test here runs with no nats-server, and with a tripwire on the NATS client: a connection attempt fails it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import nats
import nats.aio.client
import pytest

from dspyrt import (
    DSPyAssertionFramework,
    DSPyOptimizerManager,
    FourPartOptimizationLoop,
    IntegrationConfig,
    IntegrationMode,
    LabeledFewShotOptimizer,
    MetricsDashboard,
    OptimizationResult,
)
from dspyrt.agents.assertions.models import AssertionResult, AssertionType, Case, ValidationRequest
from dspyrt.agents.lm import demo_lm
from dspyrt.agents.optimizers.builtin import BootstrapFewShotOptimizer
from dspyrt.agents.optimizers.models import Budget
from dspyrt.bus import ConfigurationError, MessageValidationError
from dspyrt.runtime.config import load_config

pytestmark = pytest.mark.timeout(60)

COUNTRIES = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
]
# The demo model answers like its nearest demo: a question worded the other way finds its country's demo.
TRAINSET = [
    dspy.Example(question=f"What is the capital of {c}?", answer=a).with_inputs("question") for c, a in COUNTRIES
]
VALSET = [dspy.Example(question=f"Capital city of {c}?", answer=a).with_inputs("question") for c, a in COUNTRIES]
# The guide's test_data, which the cycle splits: a short form finds its long twin when that is in the trainset.
TEST_DATA = TRAINSET + [dspy.Example(question=f"{c}?", answer=a).with_inputs("question") for c, a in COUNTRIES]


def exact_answer(example: Any, prediction: Any, trace: Any = None) -> bool:
    return bool(example.answer == prediction.answer)


class QA(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question: str) -> Any:
        return self.answer(question=question)


@pytest.fixture(autouse=True)
def no_nats(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fails any NATS connection attempt (and records it), so "no NATS" is checked, not assumed."""
    attempts: list[str] = []

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(kwargs.get("servers") or args[1:]))
        raise AssertionError("the in-process path tried to connect to NATS")

    monkeypatch.setattr(nats, "connect", refuse)
    monkeypatch.setattr(nats.aio.client.Client, "connect", refuse)
    yield attempts
    assert attempts == []


@pytest.fixture(autouse=True)
def demo_model() -> Iterator[None]:
    with dspy.context(lm=demo_lm()):
        yield


# ------------------------------------------------------------------ the guide's Module Integration Pattern


class MyOptimizedModule(dspy.Module):
    """The guide's class; ``forward``, ``get_test_data`` and ``get_objectives`` are the parts it leaves to you."""

    def __init__(self) -> None:
        super().__init__()
        self.respond = dspy.Predict("question -> answer")
        self.optimizer = LabeledFewShotOptimizer(k=16)
        self.assertion_framework = DSPyAssertionFramework()
        self.optimization_loop = FourPartOptimizationLoop()
        self.metrics_dashboard = MetricsDashboard()

    def forward(self, question: str) -> Any:
        return self.respond(question=question)

    def get_test_data(self) -> list[Any]:
        return TEST_DATA

    def get_objectives(self) -> dict[str, Any]:
        return {"min_improvement": 10, "required_validators": [{"type": "custom"}]}

    def optimize_and_execute(self, task: Any) -> Any:
        # Run optimization cycle
        cycle = self.optimization_loop.run_cycle(
            {
                "module_class": self.__class__,
                "test_data": self.get_test_data(),
                "optimization_objectives": self.get_objectives(),
            }
        )

        # Record metrics
        self.metrics_dashboard.record_cycle_metrics(cycle)

        return cycle


class AnswersEveryInput:
    """A guide-style validator (``validate(module, test_inputs)``): the module answers each input."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, list[dict[str, Any]]]] = []

    def validate(self, module: Any, test_inputs: list[dict[str, Any]]) -> list[AssertionResult]:
        self.seen.append((module, test_inputs))
        return [
            AssertionResult(
                type=AssertionType.CUSTOM,
                check="answers",
                passed=bool(module(**inputs).answer),
                message=f"answered {inputs['question']!r}",
            )
            for inputs in test_inputs
        ]


def test_the_guides_module_integration_pattern_runs_in_process() -> None:
    module = MyOptimizedModule()
    validator = AnswersEveryInput()
    module.optimization_loop.phases.framework.add_validator(AssertionType.CUSTOM, validator)  # type: ignore[attr-defined]

    cycle = module.optimize_and_execute("answer capitals")

    assert module.optimizer.params.k == 16
    assert cycle.baseline.score == 0.0  # no demos: the demo model answers "unknown"
    assert cycle.optimized is not None and cycle.improvement_score is not None
    assert cycle.improvement_score >= 10, cycle
    assert cycle.baseline.lm_calls > 0 and cycle.optimization.lm_calls > 0
    # The validate phase gave the guide-style validator the live optimized module and the devset's inputs.
    assert len(validator.seen) == 1
    validated, inputs = validator.seen[0]
    assert isinstance(validated, MyOptimizedModule) and validated.respond.demos
    assert inputs and all(set(i) == {"question"} for i in inputs)
    assert cycle.verdict.deployed and cycle.verdict.version == 1, cycle.verdict
    deployed = module.optimization_loop.phases.registry.program(cycle.program_name)  # type: ignore[attr-defined]
    assert deployed(question="What is the capital of France?").answer == "Paris"
    # The dashboard took the cycle's result as it is.
    points = module.metrics_dashboard.series(labels={"program": "MyOptimizedModule"})
    assert points, module.metrics_dashboard.get_stats()
    stats = module.optimization_loop.get_stats()
    assert stats["cycles"] == 1 and stats["succeeded"] == 1 and stats["deployed"] == 1
    assert stats["last_improvement"] == cycle.improvement_score


def test_the_loop_gate_rejects_with_every_reason_and_get_stats_counts_failures() -> None:
    loop = FourPartOptimizationLoop()
    result = loop.run_cycle(
        {"module_class": QA, "trainset": TRAINSET, "devset": VALSET, "optimization_objectives": {"min_score": 101}},
        cycle_id="c-1",
    )
    assert result.cycle_id == "c-1" and not result.verdict.deployed
    assert any("below the required 101" in r for r in result.verdict.reasons)

    class NoForward:
        pass

    with pytest.raises(ConfigurationError, match="forward"):
        loop.run_cycle({"module_class": NoForward, "test_data": TRAINSET})
    stats = loop.get_stats()
    assert (stats["cycles"], stats["succeeded"], stats["failed"], stats["rejected"]) == (2, 1, 1, 1)
    assert "forward" in stats["last_error"]


async def test_run_cycle_works_inside_a_running_event_loop_and_arun_cycle_awaits() -> None:
    loop = FourPartOptimizationLoop()
    request = {"module_class": QA, "trainset": TRAINSET, "devset": VALSET, "metric": exact_answer}
    blocking = loop.run_cycle(request)  # a notebook: a loop is running in this thread
    awaited = await loop.arun_cycle(request)
    assert blocking.optimized is not None and awaited.optimized is not None
    assert blocking.improvement_score is not None and blocking.improvement_score > 0
    assert awaited.improvement_score == blocking.improvement_score
    assert awaited.verdict.unchanged  # the same program, state and model as the version the first deployed
    assert loop.get_stats()["succeeded"] == 2


def test_a_cycle_refuses_dataset_references_in_process() -> None:
    loop = FourPartOptimizationLoop()
    with pytest.raises(MessageValidationError, match="dataset store"):
        loop.run_cycle({"program": "question -> answer", "program_name": "qa", "trainset": "dataset:qa",
                        "devset": [{"question": "q", "answer": "a"}]})  # fmt: skip


# ----------------------------------------------------------------------------- optimize_program


def test_optimize_program_on_a_live_module_with_a_callable_metric() -> None:
    program = QA()
    result = DSPyOptimizerManager().optimize_program(program, TRAINSET, exact_answer, valset=VALSET)

    assert isinstance(result, OptimizationResult)
    assert result.optimizer == "labeled_fewshot" and result.metric == "exact_answer"
    assert result.baseline_score == 0.0 and result.optimized_score == 100.0 and result.improvement_score == 100.0
    # Counted from the configured dspy.LM: one call per validation example, before and after.
    assert result.lm_calls == 2 * len(VALSET)
    assert result.input_tokens > 0 and result.output_tokens > 0
    assert result.model == "demo/fewshot" and result.models_used == {"demo/fewshot": result.lm_calls}
    assert isinstance(result.program, QA) and result.program.answer.demos
    assert not program.answer.demos  # the caller's program is not changed
    assert "program" not in result.model_dump()


def test_optimize_program_takes_dicts_a_metric_name_and_a_budget() -> None:
    rows = [dict(example) for example in TRAINSET + VALSET]
    manager = DSPyOptimizerManager()
    result = manager.optimize_program(QA(), rows, "exact_match", budget=Budget(max_lm_calls=2))
    assert result.status == "budget_exhausted" and result.lm_calls == 2
    assert result.program is None
    assert manager.get_stats()["labeled_fewshot"]["failures"] == 1


def test_the_guides_performance_testing_pattern() -> None:
    system = DSPyOptimizerManager()
    program, test_data, metric = QA(), TEST_DATA, exact_answer
    result = system.optimize_program(program, test_data, metric)
    assert result.improvement_score is not None and result.improvement_score > 0.0  # Should show improvement


def test_builtin_optimizers_take_their_params_as_keywords() -> None:
    assert LabeledFewShotOptimizer(k=16).params.k == 16
    assert LabeledFewShotOptimizer({"k": 3}).params.k == 3  # the registry's factories pass a dict
    assert BootstrapFewShotOptimizer(max_bootstrapped_demos=2).params.max_bootstrapped_demos == 2
    with pytest.raises(MessageValidationError, match="labeled_fewshot"):
        LabeledFewShotOptimizer(k=0)
    with pytest.raises(MessageValidationError):
        LabeledFewShotOptimizer(kk=16)


# ------------------------------------------------------------------------------------ plugins


class MyCustomOptimizer:
    """The guide's "Adding New Optimizers": a config dict, and optimize(program, test_data, metric)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def optimize(self, program: Any, test_data: list[Any], metric: Any) -> Any:
        scored = [example for example in test_data if metric(example, example)]
        program.answer.demos = scored[: self.config.get("demos", 4)]
        return None  # optimized in place, as the guide's OptimizationResult-returning optimizers do


class OptimizerPlugin:
    """The guide's "Plugin Architecture": optimize(program, test_data), no metric."""

    def optimize(self, program: Any, test_data: list[Any]) -> Any:
        optimized = program.deepcopy()
        optimized.answer.demos = list(test_data)
        return optimized


def test_a_guide_style_optimizer_is_adapted_at_registration() -> None:
    manager = DSPyOptimizerManager()
    manager.register_optimizer("my_custom", MyCustomOptimizer)
    manager.set_active_optimizer("my_custom")
    result = manager.optimize_program(QA(), TRAINSET, exact_answer, valset=VALSET, params={"demos": 8})
    assert result.optimizer == "my_custom" and result.optimized_score == 100.0
    assert len(result.program.answer.demos) == 8

    manager.register_optimizer("plugin", OptimizerPlugin())
    result = manager.optimize_program(QA(), TRAINSET, exact_answer, valset=VALSET, optimizer="plugin")
    assert result.improvement_score == 100.0


@pytest.mark.parametrize("plugin", [type("Neither", (), {}), type("Neither", (), {})(), 42])
def test_an_optimizer_with_neither_method_is_refused_at_registration(plugin: Any) -> None:
    manager = DSPyOptimizerManager()
    with pytest.raises(ConfigurationError) as caught:
        manager.register_optimizer("neither", plugin)
    assert "compile(ctx" in caught.value.message and "optimize(program, test_data, metric)" in caught.value.message
    assert "neither" not in manager.list_optimizers()


def test_a_guide_style_validator_is_adapted_and_runs_on_a_live_module() -> None:
    framework = DSPyAssertionFramework()
    validator = AnswersEveryInput()
    framework.add_validator(AssertionType.CUSTOM, validator)
    program = QA()
    report = framework.validate_module(program, [{"question": "Capital city of Peru?"}], types=["custom"])
    assert validator.seen == [(program, [{"question": "Capital city of Peru?"}])]
    assert report.passed and report.counts["custom"].results == 1

    # Recorded outputs alone (the bus): it cannot run, and says so rather than pass or crash.
    request = ValidationRequest(cases=[Case(inputs={"question": "q"}, outputs={"answer": "a"})], types=["custom"])
    report = framework.check(request)
    assert [(r.check, r.severity.value, r.passed) for r in report.results] == [("needs_module", "warning", False)]


class NoValidate:
    pass


class ValidateTakesNothing:
    def validate(self) -> list[Any]:
        return []


@pytest.mark.parametrize("validator", [NoValidate(), ValidateTakesNothing(), AnswersEveryInput])
def test_a_validator_with_neither_interface_is_refused_at_registration(validator: Any) -> None:
    framework = DSPyAssertionFramework()
    with pytest.raises(ConfigurationError) as caught:
        framework.add_validator(AssertionType.CUSTOM, validator)
    assert "validate(request" in caught.value.message and "validate(module, test_inputs" in caught.value.message


# ------------------------------------------------------------------------------- IntegrationMode


def test_integration_mode_takes_the_guides_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert IntegrationMode.FULL_INTEGRATION is IntegrationMode.FULL
    assert IntegrationMode("full_integration") is IntegrationMode.FULL
    assert IntegrationMode("OPTIMIZATION_ONLY") is IntegrationMode.OPTIMIZATION_ONLY
    assert IntegrationMode.FULL_INTEGRATION.value == "full"  # the canonical value stays
    assert list(IntegrationMode) == [IntegrationMode.FULL, IntegrationMode.OPTIMIZATION_ONLY,
                                     IntegrationMode.MONITORING_ONLY]  # fmt: skip
    assert IntegrationConfig(mode=IntegrationMode.FULL_INTEGRATION).mode is IntegrationMode.FULL
    monkeypatch.setenv("DSPYRT_MODE", "full_integration")
    assert load_config().mode is IntegrationMode.FULL
    monkeypatch.delenv("DSPYRT_MODE")
    Path("dspyrt.toml").write_text('mode = "full_integration"\n')  # the fixture's own empty directory
    assert load_config().mode is IntegrationMode.FULL
    with pytest.raises(ValueError):
        IntegrationMode("full_integrationx")


def test_the_readmes_in_process_example_runs_as_written(tmp_path: Path) -> None:
    """The python block of the README's "In-process (no bus)" part, run as a script: no NATS, no system."""
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    part = re.search(r"^### In-process \(no bus\)\n(.*?)(?=^##)", readme, re.S | re.M)
    assert part is not None, "README.md lost its 'In-process (no bus)' part"
    block = re.search(r"^```python\n(.*?)^```", part.group(1), re.S | re.M)
    assert block is not None
    script = tmp_path / "in_process.py"
    script.write_text(block.group(1))
    # An unreachable NATS URL: the example must not need one.
    env = {**os.environ, "DSPYRT_NATS_URLS": "nats://127.0.0.1:1"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout
    baseline, optimized, lm_calls = (float(v) for v in lines[0].split()[:3])
    assert optimized > baseline and lm_calls > 0, lines[0]
    improvement, deployed = lines[1].split()[:2]
    assert float(improvement) > 0 and deployed == "True", lines[1]
