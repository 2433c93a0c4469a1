"""Failures in the loop's evaluation path, over a real nats-server: an LM hop that cannot be made fails the
shard (it does not score the examples 0), a misnamed metric field fails before any LM call, and a finished
failed shard fails its evaluation at once with the shard's own error code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dspyrt.agents.switcher.models import SwitcherStats
from dspyrt.bus import Empty, TaskRecord, TaskStatus
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.registry import available_agents
from tests.helpers import serving

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZE = json.loads((ROOT / "examples" / "optimize.json").read_text())["input"]

pytestmark = pytest.mark.timeout(60)

FAILING_MODELS = """
[[models]]
model = "demo/fewshot"
faults = { error_rate = 1.0 }
"""


def agents(*names: str) -> list[Any]:
    known = available_agents()
    return [known[n] for n in names]


def evaluation(**changes: Any) -> dict[str, Any]:
    """Ten devset examples in two shards, on a pinned model (so no switcher is asked to select one)."""
    job = {
        "program": {"spec": OPTIMIZE["program"]},
        "devset": OPTIMIZE["valset"][:10],
        "shard_size": 5,
        "num_threads": 2,
        "model": "demo/fewshot",
    }
    return {**job, **changes}


@pytest.fixture
def errors_config(config: IntegrationConfig) -> IntegrationConfig:
    # Two deliveries: a failing shard is retried once (after 1 s), then dead-lettered.
    return config.model_copy(update={"auto_validate": False, "task_max_deliver": 2})


def assert_failed_by_its_shard(record: TaskRecord, *expected: str) -> None:
    assert record.status is TaskStatus.FAILED, record
    assert record.attempts == 1  # a finished shard is not waited for again
    assert record.error is not None and record.error.code != "internal", record.error
    assert "shard" in record.error.message, record.error
    for text in expected:
        assert text in record.error.message, record.error


async def test_a_shard_without_a_switcher_fails_instead_of_scoring_zero(errors_config: IntegrationConfig) -> None:
    async with serving(errors_config, agents("loop-evaluate", "evaluator")) as system:
        record = await system.client.run("evaluate", evaluation(), timeout=40)
        shard = await system.client.task(f"{record.id}-s0")
    assert shard.status is TaskStatus.DEAD and shard.attempts == 2, shard  # retried, then dead-lettered
    assert shard.error is not None and "unavailable" in shard.error.message and "switcher" in shard.error.message
    assert_failed_by_its_shard(record, "unavailable", "switcher.complete")


async def test_an_evaluation_whose_only_model_fails_is_provider_unreliable_not_zero(
    errors_config: IntegrationConfig, tmp_path: Path
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(FAILING_MODELS)
    failing = errors_config.model_copy(update={"models_file": models})
    async with serving(failing, agents("switcher", "loop-evaluate", "evaluator")) as system:
        record = await system.client.run("evaluate", evaluation(), timeout=60)
        shard = await system.client.task(f"{record.id}-s0")
    # Each example's call failed (after the switcher's retries and one more try): errors, not wrong answers.
    assert shard.status is TaskStatus.SUCCEEDED, shard
    assert all(r["call_failed"] and r["error"] for r in shard.result["results"]), shard.result
    assert record.status is TaskStatus.FAILED and record.attempts == 1, record
    assert record.error is not None and record.error.code == "provider_unreliable", record.error
    assert "10 of 10 LM calls to demo/fewshot failed" in record.error.message, record.error


async def test_a_misnamed_metric_field_fails_before_any_lm_call(errors_config: IntegrationConfig) -> None:
    async with serving(errors_config, agents("switcher", "loop-evaluate", "evaluator")) as system:
        record = await system.client.run("evaluate", evaluation(metric_field="topik"), timeout=40)
        shard = await system.client.store.get(f"{record.id}-s0")
        stats = await system.client.request("switcher", "stats", Empty(), SwitcherStats)
    assert record.status is TaskStatus.FAILED and record.attempts == 1, record
    assert record.error is not None and record.error.code == "invalid_message"
    assert "example 0 lacks the metric field 'topik'" in record.error.message
    assert shard is None and stats.instance_calls == 0


async def test_an_example_without_a_label_fails_the_evaluation(errors_config: IntegrationConfig) -> None:
    """The default metric cannot score it: a configuration error, not a score of 0 for that example."""
    devset = [*OPTIMIZE["valset"][:3], {"text": "a label-less example"}]
    async with serving(errors_config, agents("switcher", "loop-evaluate", "evaluator")) as system:
        record = await system.client.run("evaluate", evaluation(devset=devset), timeout=40)
    assert record.status is TaskStatus.FAILED and record.error is not None, record
    assert record.error.code == "invalid_config" and "no output fields to compare" in record.error.message


async def test_a_failed_shard_fails_its_evaluation_with_the_shards_own_code(errors_config: IntegrationConfig) -> None:
    missing = {"store": "elsewhere", "name": "p", "version": "1", "sha256": "", "size": 0}
    job = evaluation(program={"spec": OPTIMIZE["program"], "artifact": missing})
    async with serving(errors_config, agents("switcher", "loop-evaluate", "evaluator")) as system:
        record = await system.client.run("evaluate", job, timeout=40)
        shard = await system.client.task(f"{record.id}-s0")
    assert shard.status is TaskStatus.FAILED and shard.error is not None and shard.error.code == "not_found"
    assert_failed_by_its_shard(record, "artifact store elsewhere")
    assert record.error is not None and record.error.code == "not_found"
