"""Honest results with a real HTTP provider: the local demo provider (``dspyrt.agents.lm.demo_provider``) in its own
process, called by the switcher through the real ``dspy.LM("openai/...")`` path, on a real nats-server.

Each test is one of the issue's "done when" rules: faults do not move scores, the system's own cache answers
repeats and says so, a refused key fails the task at once with the provider's reason (and the key nowhere), a
stopped provider with a declared fallback gives a flagged mixed-model result the gate refuses, and without one
the task fails instead of reporting a score.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspyrt.agents.lm.demo_provider import DemoProviderProcess, run_demo_provider
from dspyrt.bus import TaskStatus
from dspyrt.runtime.config import IntegrationConfig
from dspyrt.runtime.registry import available_agents
from dspyrt.runtime.telemetry import current_telemetry
from tests.helpers import serving, wait_until
from tests.test_secrets import every_log_record, stream_messages

pytestmark = pytest.mark.timeout(180)

MODEL = "openai/demo-model"
KEY_VARIABLE = "DSPYRT_TEST_PROVIDER_KEY"
PRICES = (1.0, 2.0)  # USD per million input / output tokens
PROGRAM = {
    "signature": "text -> topic",
    "instructions": "Classify the text into one topic: sports, cooking, technology, finance or weather.",
}
WORDS = {
    "sports": "match goal team coach league season striker tournament referee stadium",
    "cooking": "simmer garlic sauce oven bake whisk recipe flour butter dough",
    "technology": "software chip server laptop network update processor cloud app code",
    "finance": "revenue shares market bank interest investors quarterly profit bond stock",
    "weather": "rain storm forecast wind frost sunny clouds temperature snow humid",
}


def topic_examples(n: int, seed: int = 7) -> list[dict[str, str]]:
    """``n`` short texts of five topics, each made of its topic's words (the demo engine answers by overlap)."""
    rng = random.Random(seed)
    topics = sorted(WORDS)
    rows = []
    for i in range(n):
        topic = topics[i % len(topics)]
        words = rng.sample(WORDS[topic].split(), 3) + rng.sample(WORDS[rng.choice(topics)].split(), 1)
        rows.append({"text": " ".join(words), "topic": topic})
    return rows


EXAMPLES = topic_examples(120)


def optimize_task(**changes: Any) -> dict[str, Any]:
    return {
        "program": PROGRAM,
        "program_name": "topics",
        "trainset": EXAMPLES[:84],
        "valset": EXAMPLES[84:],
        "optimizer": "labeled_fewshot",
        "params": {"k": 16},
        "model": MODEL,
        "num_threads": 4,
        **changes,
    }


def models_file(path: Path, provider: DemoProviderProcess, *, fallback: bool) -> Path:
    chain = 'fallback = ["demo/fewshot"]' if fallback else "fallback = []"
    path.write_text(
        f"""
[[models]]
model = "{MODEL}"
api_base = "{provider.url}"
api_key_env = "{KEY_VARIABLE}"
input_cost_per_million = {PRICES[0]}
output_cost_per_million = {PRICES[1]}
max_concurrency = 16
{chain}

[[models]]
model = "demo/fewshot"
max_concurrency = 16
"""
    )
    return path


@pytest.fixture
def provider_env(monkeypatch: pytest.MonkeyPatch) -> str:
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_VARIABLE, key)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    return key


@pytest.fixture
def provider(provider_env: str) -> Iterator[DemoProviderProcess]:
    with run_demo_provider(api_key=provider_env) as process:
        yield process


def agents(*names: str) -> list[Any]:
    known = available_agents()
    return [known[n] for n in names]


def system_config(config: IntegrationConfig, tmp_path: Path, provider: DemoProviderProcess, *, fallback: bool = False,
                  **changes: Any) -> IntegrationConfig:  # fmt: skip
    models = models_file(tmp_path / f"models-{uuid.uuid4().hex[:6]}.toml", provider, fallback=fallback)
    return config.model_copy(update={"models_file": models, "shutdown_grace": 1.0, **changes})


def served_cost(stats: dict[str, Any]) -> float:
    return (stats["prompt_tokens"] * PRICES[0] + stats["completion_tokens"] * PRICES[1]) / 1e6


# ------------------------------------------------------------------------------------------ faults


async def test_provider_faults_do_not_move_the_scores(
    config: IntegrationConfig, tmp_path: Path, provider: DemoProviderProcess
) -> None:
    """10 % 429s (with Retry-After) and 5 % 500s: the same held-out scores as with no faults, and the result's
    request count, tokens and cost are what the provider served."""
    settings = system_config(config, tmp_path, provider)
    async with serving(settings, agents("switcher", "optimizer")) as system:
        clean = await system.client.run("optimize", optimize_task(no_cache=True), timeout=120)
        assert clean.status is TaskStatus.SUCCEEDED, clean.error
        served_clean = await anyio.to_thread.run_sync(provider.stats)
        await anyio.to_thread.run_sync(lambda: provider.control(rate_limit_rate=0.10, error_rate=0.05, seed=3))
        await anyio.to_thread.run_sync(provider.reset)
        faulty = await system.client.run("optimize", optimize_task(no_cache=True), timeout=120)
        assert faulty.status is TaskStatus.SUCCEEDED, faulty.error
        served = await anyio.to_thread.run_sync(provider.stats)
    a, b = clean.result, faulty.result
    assert (b["baseline_score"], b["optimized_score"]) == (a["baseline_score"], a["optimized_score"])
    assert b["baseline_coverage"] == b["optimized_coverage"] == 1.0 and b["failed_calls"] == 0
    # The faults really happened, and every request the provider saw is accounted for.
    assert served["rate_limited"] > 0 and served["errors"] > 0, served
    assert b["provider_requests"] == served["requests"] > served["ok"] == b["lm_calls"] - b["cached_calls"]
    assert (b["input_tokens"], b["output_tokens"]) == (served["prompt_tokens"], served["completion_tokens"])
    assert b["cost"] == pytest.approx(served_cost(served), abs=1e-6)
    assert a["provider_requests"] == served_clean["requests"] == a["lm_calls"]
    assert b["models_used"] == {MODEL: b["lm_calls"]} and b["mixed_models"] is False


# ------------------------------------------------------------------------------------------- cache


async def test_the_same_task_twice_is_answered_by_the_cache_and_no_cache_pays_again(
    config: IntegrationConfig, tmp_path: Path, provider: DemoProviderProcess
) -> None:
    settings = system_config(config, tmp_path, provider)
    # Different seeds: the optimization cache would otherwise return the first result without any LM call.
    async with serving(settings, agents("switcher", "optimizer")) as system:
        first = await system.client.run("optimize", optimize_task(seed=1), timeout=120)
        after_first = await anyio.to_thread.run_sync(provider.stats)
        second = await system.client.run("optimize", optimize_task(seed=1, params={"k": 16, "sample": True},
                                                                   num_threads=2), timeout=120)  # fmt: skip
        after_second = await anyio.to_thread.run_sync(provider.stats)
        bypass = await system.client.run("optimize", optimize_task(seed=1, no_cache=True), timeout=120)
        after_bypass = await anyio.to_thread.run_sync(provider.stats)
        events = await stream_messages(system.bus, settings.subject_prefix)
    for record in (first, second, bypass):
        assert record.status is TaskStatus.SUCCEEDED, record.error
    one, two, three = first.result, second.result, bypass.result
    assert one["cached_calls"] == 0 and one["cost"] > 0 and after_first["ok"] == one["lm_calls"]
    # The second run made no provider request: every call was answered from the cache, at no cost.
    assert after_second["requests"] == after_first["requests"]
    assert two["cached_calls"] == two["lm_calls"] > 0 and two["provider_requests"] == 0
    assert (two["cost"], two["input_tokens"], two["output_tokens"]) == (0.0, 0, 0)
    assert (two["baseline_score"], two["optimized_score"]) == (one["baseline_score"], one["optimized_score"])
    # no_cache pays for every call again.
    assert three["cached_calls"] == 0 and after_bypass["requests"] - after_second["requests"] == three["lm_calls"]
    assert three["cost"] == pytest.approx(one["cost"])
    # Every lm.call event says where its answer came from.
    stream = settings.subjects.event_stream
    sources = [json.loads(data)["data"].get("source") for _, data in events[stream]
               if b'"lm.call"' in data]  # fmt: skip
    assert sources.count("cache") == two["cached_calls"] and sources.count("provider") >= one["lm_calls"] * 2


# -------------------------------------------------------------------------------------- a bad key


async def test_a_refused_key_fails_the_task_at_once_with_the_providers_reason(
    config: IntegrationConfig, tmp_path: Path, provider: DemoProviderProcess, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    wrong = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_VARIABLE, wrong)
    settings = system_config(config, tmp_path, provider, fallback=True)
    with every_log_record(caplog):
        async with serving(settings, agents("switcher", "optimizer")) as system:
            record = await system.client.run("optimize", optimize_task(), timeout=30)
            messages = await stream_messages(system.bus, settings.subject_prefix)
    served = await anyio.to_thread.run_sync(provider.stats)
    assert record.status is TaskStatus.FAILED and record.attempts == 1, record
    assert record.error is not None and record.error.code == "provider_error", record.error
    message = record.error.message
    assert MODEL in message and "HTTP 401" in message and KEY_VARIABLE in message, message
    assert "Incorrect API key" in message and "Execution cancelled" not in message, message
    # Not retried as if transient, and no fallback for a permanent refusal: a handful of calls at most (the
    # ones already in flight on the run's threads), never the demo model.
    assert 1 <= served["unauthorized"] <= 4 and served["requests"] == served["unauthorized"], served
    # The key the provider quoted is nowhere: not in the record, any stream message, span or log record.
    assert wrong not in record.model_dump_json()
    for stream, entries in messages.items():
        for headers, data in entries:
            assert wrong not in data.decode("utf-8", "replace") + json.dumps(headers), stream
    telemetry = current_telemetry()
    assert telemetry is not None
    telemetry.flush()
    spans = Path(telemetry.span_destination).parent.parent
    for file in spans.rglob("*"):
        if file.is_file():
            assert wrong not in file.read_text("utf-8", "replace"), file
    assert wrong not in caplog.text
    assert KEY_VARIABLE in message and "OPENAI_API_KEY" not in message


# --------------------------------------------------------------------------- the provider goes away


async def test_a_stopped_provider_with_a_declared_fallback_gives_a_flagged_mixed_result_the_gate_refuses(
    config: IntegrationConfig, tmp_path: Path, provider: DemoProviderProcess
) -> None:
    settings = system_config(config, tmp_path, provider, fallback=True)
    cycle = {
        "program_name": "topics",
        "program": PROGRAM,
        "trainset": EXAMPLES[:60],
        "devset": EXAMPLES[60:100],
        "optimizer": "labeled_fewshot",
        "model": MODEL,
        "shard_size": 10,
        "objectives": {"min_improvement": -100},
    }
    await anyio.to_thread.run_sync(lambda: provider.control(latency=0.2))
    loop = ("switcher", "loop-create", "loop-evaluate", "evaluator", "optimizer", "loop-deploy", "cycle")
    async with serving(settings.model_copy(update={"auto_validate": False}), agents(*loop)) as system:
        task_id = (await system.client.submit("cycle", cycle)).task_id

        async def halfway() -> bool:
            return int((await anyio.to_thread.run_sync(provider.stats))["ok"]) >= 30

        await wait_until(halfway, timeout=60, what="the provider answered 30 calls")
        await anyio.to_thread.run_sync(provider.stop)
        record = await system.client.result(task_id, timeout=150)
    assert record.status is TaskStatus.SUCCEEDED, record.error
    result = record.result
    assert result["mixed_models"] is True and set(result["models_used"]) == {MODEL, "demo/fewshot"}
    assert result["baseline"]["coverage"] == 1.0
    verdict = result["verdict"]
    assert verdict["deployed"] is False and verdict["checks"]["single_model"] is False
    assert any("more than one model answered" in reason for reason in verdict["reasons"]), verdict


async def test_a_stopped_provider_without_fallback_fails_the_task_instead_of_scoring(
    config: IntegrationConfig, tmp_path: Path, provider: DemoProviderProcess
) -> None:
    settings = system_config(config, tmp_path, provider, fallback=False)
    await anyio.to_thread.run_sync(lambda: provider.control(latency=0.2))
    task = optimize_task(trainset=EXAMPLES[:40], valset=EXAMPLES[40:64])
    async with serving(settings, agents("switcher", "optimizer")) as system:
        task_id = (await system.client.submit("optimize", task)).task_id

        async def started() -> bool:
            return int((await anyio.to_thread.run_sync(provider.stats))["ok"]) >= 8

        await wait_until(started, timeout=60, what="the provider answered 8 calls")
        await anyio.to_thread.run_sync(provider.stop)
        record = await system.client.result(task_id, timeout=150)
    assert record.status is TaskStatus.FAILED and record.attempts == 1, record
    assert record.error is not None and record.error.code in ("provider_unreliable", "provider_error"), record.error
    assert MODEL in record.error.message and "failed after retries and fallback" in record.error.message
