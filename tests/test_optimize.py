"""The optimize task end to end over a real nats-server: switcher + optimizer agents on the demo engine."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspyrt.agents.optimizers.agent import OptimizerAgent
from dspyrt.agents.optimizers.models import OptimizerList, OptimizerStatsReply
from dspyrt.agents.switcher.agent import Background, SwitcherAgent
from dspyrt.agents.switcher.models import CompletionReply, CompletionRequest, SwitcherStats
from dspyrt.bus import Bus, Empty, RemoteError, TaskStatus
from dspyrt.bus.streams import read_tail
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.telemetry import Telemetry
from dspyrt.runtime.traces import read_spans
from tests.helpers import serving

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = json.loads((ROOT / "examples" / "optimize.json").read_text())["input"]

pytestmark = pytest.mark.timeout(90)

MODELS = """
[[models]]
model = "demo/fewshot"
tags = ["optimize"]
max_concurrency = 16

[[models]]
model = "demo/second"
max_concurrency = 16
input_cost_per_million = 1.0
output_cost_per_million = 2.0

[[models]]
model = "demo/broken"
tags = ["flaky"]
faults = { error_rate = 1.0 }
fallback = ["demo/second"]
"""


@pytest.fixture
def models_config(config: IntegrationConfig, tmp_path: Path) -> IntegrationConfig:
    path = tmp_path / "models.toml"
    path.write_text(MODELS)
    return config.model_copy(update={"models_file": path})


def task(**changes: Any) -> dict[str, Any]:
    return {**EXAMPLE, **changes}


async def test_labeled_fewshot_raises_the_held_out_score(models_config: IntegrationConfig) -> None:
    async with serving(models_config, [SwitcherAgent, OptimizerAgent]) as system:
        record = await system.client.run("optimize", task(), timeout=60)
        assert record.status is TaskStatus.SUCCEEDED, record.error
        result = record.result
        assert result["optimizer"] == "labeled_fewshot" and result["params"] == {"k": 16}
        assert result["valset_size"] == 20 and result["trainset_size"] == 40
        assert result["optimized_score"] > result["baseline_score"]
        assert result["improvement_score"] == pytest.approx(result["optimized_score"] - result["baseline_score"])
        # Every LM call went through the switcher: its figures count the same calls.
        stats = await system.client.request("switcher", "stats", Empty(), SwitcherStats)
        served = {m.model: m.calls for m in stats.models}
        assert served["demo/fewshot"] == result["lm_calls"] > 0
        # The artifact is the program's dump_state(), versioned by task id, in the object store.
        store = await system.bus.js.object_store(result["artifact"]["store"])
        document = json.loads((await store.get(result["artifact"]["name"])).data)
        assert document["program_name"] == "topic-classifier"
        assert document["task_id"] == result["artifact"]["version"] == record.id
        assert len(document["state"]["demos"]) == 16


async def test_bootstrap_and_mipro_complete_over_the_bus(models_config: IntegrationConfig) -> None:
    small = {"trainset": EXAMPLE["trainset"][:12], "valset": EXAMPLE["valset"][:6]}
    async with serving(models_config, [SwitcherAgent, OptimizerAgent]) as system:
        bootstrap = await system.client.run(
            "optimize",
            task(optimizer="bootstrap_fewshot", params={"max_bootstrapped_demos": 2, "max_labeled_demos": 4}, **small),
            timeout=60,
        )
        mipro = await system.client.run(
            "optimize",
            task(
                optimizer="mipro_v2",
                params={"auto": None, "num_candidates": 2, "num_trials": 2, "max_bootstrapped_demos": 1,
                        "max_labeled_demos": 2},
                **small,
            ),
            timeout=80,
        )  # fmt: skip
    for record, name in ((bootstrap, "bootstrap_fewshot"), (mipro, "mipro_v2")):
        assert record.status is TaskStatus.SUCCEEDED, record.error
        assert record.result["optimizer"] == name
        assert record.result["optimized_score"] is not None and record.result["lm_calls"] > 0
        assert record.result["artifact"] is not None


async def test_switcher_falls_back_when_a_model_errors(models_config: IntegrationConfig, telemetry: Telemetry) -> None:
    async with serving(models_config, [SwitcherAgent]) as system:
        request = CompletionRequest(
            messages=[{"role": "user", "content": "hello"}],  # type: ignore[list-item]
            model="demo/broken",
        )
        reply = await system.client.request("switcher", "complete", request, CompletionReply)
        assert reply.model != "demo/broken" and reply.tried[0] == "demo/broken"
        # the trace says which model served the call, what it cost and what was tried first
        telemetry.flush()
        name = f"process {models_config.subjects.endpoint('switcher', 'complete')}"
        [span] = [x for x in read_spans(Path(telemetry.span_destination).parent.parent) if x["name"] == name]
        assert span["attributes"]["gen_ai.request.model"] == "demo/broken"
        assert span["attributes"]["gen_ai.response.model"] == reply.model
        assert span["attributes"]["gen_ai.usage.output_tokens"] == reply.usage.output_tokens
        assert span["attributes"]["dspyrt.lm.tried"] == reply.tried
        stats = {m.model: m for m in (await system.client.request("switcher", "stats", Empty(), SwitcherStats)).models}
        assert stats["demo/broken"].failures >= 1 and stats["demo/broken"].successes == 0
        assert stats[reply.model].successes == 1
        # Without fallback the failure reaches the caller as a structured error.
        pinned = request.model_copy(update={"fallback": False})
        with pytest.raises(RemoteError) as failed:
            await system.client.request("switcher", "complete", pinned, CompletionReply)
        assert failed.value.code == "all_models_failed"


async def test_a_budget_stops_the_run_with_a_report(models_config: IntegrationConfig) -> None:
    async with serving(models_config, [SwitcherAgent, OptimizerAgent]) as system:
        record = await system.client.run("optimize", task(budget={"max_lm_calls": 5}, num_threads=1), timeout=60)
    assert record.status is TaskStatus.SUCCEEDED
    assert record.result["status"] == "budget_exhausted"
    assert "5 calls" in record.result["stopped_reason"]
    assert record.result["lm_calls"] == 5
    assert record.result["optimized_score"] is None


async def test_cache_hit_returns_the_stored_result_and_changed_data_misses(models_config: IntegrationConfig) -> None:
    async with serving(models_config, [SwitcherAgent, OptimizerAgent]) as system:
        first = await system.client.run("optimize", task(), timeout=60)
        again = await system.client.run("optimize", task(), timeout=60)
        changed = await system.client.run("optimize", task(trainset=EXAMPLE["trainset"][:-1]), timeout=60)
        forced = await system.client.run("optimize", task(no_cache=True), timeout=60)
    assert first.result["cached"] is False
    assert again.result["cached"] is True
    assert again.result["optimized_score"] == first.result["optimized_score"]
    assert again.result["artifact"] == first.result["artifact"]
    assert changed.result["cached"] is False and changed.result["trainset_size"] == 39
    assert forced.result["cached"] is False and forced.result["lm_calls"] > 0


@pytest.mark.parametrize(
    ("changes", "code", "words"),
    [
        ({"program": {"signature": "text ->"}}, "invalid_message", "program"),
        ({"metric": "nonsense"}, "not_found", "exact_match"),
        ({"optimizer": "nonsense"}, "not_found", "labeled_fewshot"),
        ({"trainset": []}, "invalid_message", "trainset"),
        ({"params": {"k": "many"}}, "invalid_message", "k"),
    ],
)
async def test_bad_requests_fail_clearly_and_the_agents_keep_running(
    models_config: IntegrationConfig, changes: dict[str, Any], code: str, words: str
) -> None:
    async with serving(models_config, [SwitcherAgent, OptimizerAgent]) as system:
        record = await system.client.run("optimize", task(**changes), timeout=30)
        assert record.status is TaskStatus.FAILED
        assert record.error is not None and record.error.code == code
        assert words in (record.error.message + json.dumps([f.model_dump() for f in record.error.field_errors]))
        assert record.attempts == 1  # permanent: not retried
        # Still serving.
        listing = await system.client.request("optimizer", "list", Empty(), OptimizerList)
        assert "labeled_fewshot" in listing.optimizers
        good = await system.client.run("optimize", task(), timeout=60)
        assert good.status is TaskStatus.SUCCEEDED


async def test_concurrent_tasks_with_different_models_keep_their_own_lm(models_config: IntegrationConfig) -> None:
    async with serving(models_config, [SwitcherAgent, OptimizerAgent]) as system:
        records: dict[str, Any] = {}

        async def run(model: str) -> None:
            records[model] = await system.client.run("optimize", task(model=model, no_cache=True), timeout=60)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "demo/fewshot")
            tg.start_soon(run, "demo/second")
        stats = {m.model: m for m in (await system.client.request("switcher", "stats", Empty(), SwitcherStats)).models}
        optimizer_stats = await system.client.request("optimizer", "stats", Empty(), OptimizerStatsReply)
    for model, record in records.items():
        assert record.status is TaskStatus.SUCCEEDED, record.error
        assert record.result["model"] == model
        # Each run's calls reached its own model only: had the runs shared an LM, the counts would mix.
        assert stats[model].calls == record.result["lm_calls"]
    assert records["demo/second"].result["cost"] > 0 == records["demo/fewshot"].result["cost"]
    assert optimizer_stats.stats["labeled_fewshot"]["runs"] == 2


async def test_select_names_the_deployed_version_for_the_chosen_model(models_config: IntegrationConfig) -> None:
    from dspyrt.agents.deployments import DeployedVersion, DeployRegistry
    from dspyrt.agents.switcher.models import Selection, SelectRequest

    async with serving(models_config, [SwitcherAgent]) as system:
        registry = await DeployRegistry.open(system.bus)
        await registry.point(DeployedVersion(program="topics", version=1, artifact_store="s", artifact_name="a/1"))
        await registry.point(
            DeployedVersion(program="topics", version=2, artifact_store="s", artifact_name="a/2", model="demo/fewshot")
        )
        chosen = await system.client.request(
            "switcher", "select", SelectRequest(task_kind="optimize", program="topics"), Selection
        )
        other = await system.client.request(
            "switcher", "select", SelectRequest(tags=["flaky"], program="topics"), Selection
        )
        none = await system.client.request("switcher", "select", SelectRequest(program="unknown"), Selection)
    assert chosen.model == "demo/fewshot" and chosen.deployed is not None and chosen.deployed["version"] == 2
    assert other.model == "demo/broken" and other.deployed is not None and other.deployed["version"] == 1
    assert none.deployed is None and "eligible" in none.reason


def test_a_model_name_a_kv_key_cannot_hold_is_encoded() -> None:
    from dspyrt.agents.deployments import pointer_key

    assert pointer_key("p", "demo/fewshot") == "p.model.demo/fewshot"
    encoded = pointer_key("p", "ollama_chat/llama3.1:8b")
    assert ":" not in encoded and encoded.startswith("p.model.=")
    assert encoded != pointer_key("p", "ollama_chat/llama3.1:7b")


def test_a_completion_without_a_user_or_assistant_turn_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="user or assistant"):
        CompletionRequest(messages=[{"role": "system", "content": "only a prompt"}])  # type: ignore[list-item]


async def test_a_stopping_switcher_still_stores_the_event_of_every_call_it_answered(config: IntegrationConfig) -> None:
    """The ``lm.call`` event and the cache write go out after the reply: stopping the switcher right after its last
    reply must not cancel them."""
    calls = 40
    async with serving(config, [SwitcherAgent]) as system:

        async def one(i: int) -> None:
            request = CompletionRequest(
                messages=[{"role": "user", "content": f"call {i}"}],  # type: ignore[list-item]
                no_cache=True,
            )
            await system.client.request("switcher", "complete", request, CompletionReply)

        async with anyio.create_task_group() as tg:
            for i in range(calls):
                tg.start_soon(one, i)
    async with Bus(config.connection_options(name="reader"), config.subjects) as reader:
        events = await read_tail(reader, config.subjects.event_stream, 10 * calls)
    assert sum(b'"lm.call"' in data for _, _, data in events) == calls


async def test_deferred_switcher_writes_finish_when_the_switcher_is_stopped() -> None:
    done: list[int] = []

    async def slow_write(i: int) -> None:
        await anyio.sleep(0.2)
        done.append(i)

    with anyio.fail_after(5), anyio.CancelScope() as stop:
        async with anyio.create_task_group() as tg:
            background = Background(tg)
            for i in range(3):
                await background.run(partial(slow_write, i))
            stop.cancel()  # the host stopping the switcher right after its replies
    assert sorted(done) == [0, 1, 2]
    assert background.pending == 0
