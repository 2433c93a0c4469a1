"""The agents' LM layer, offline: the demo engine, fault injection and the model registry.

Everything runs through the real ``dspy.LM`` with our engines on DSPy 3.4's engine contract; nothing is mocked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import dspy
import pytest
from dspy.lm15 import Config, Message, Request, Response
from dspy.utils.exceptions import LMRateLimitError, LMServerError, is_retryable_lm_error

import dspyrt.agents.lm as lm_package
from dspyrt.agents.lm import (
    AsyncDemoFewShotEngine,
    AsyncFaultyEngine,
    DemoFewShotEngine,
    FaultInjector,
    FaultProfile,
    FaultyEngine,
    FixedLatency,
    InjectedFaultError,
    LogNormalLatency,
    ModelRegistry,
    ModelSpec,
    RateLimitedError,
    UniformLatency,
    build_lm,
    demo_lm,
)
from dspyrt.agents.metrics import get_metric
from dspyrt.bus.errors import ConfigurationError, NotFoundError

pytestmark = pytest.mark.timeout(30)

# A made-up task: the topic of a short sentence. Test sentences share keywords with training sentences of
# the same topic, so answering like the nearest demo is right once the demos are in the prompt.
TRAIN = [
    ("the team scored a late goal in the match", "sports"),
    ("our striker kicked the ball past the keeper", "sports"),
    ("the coach praised the players after the game", "sports"),
    ("bake the bread in a hot oven", "cooking"),
    ("mix the flour and sugar for the cake recipe", "cooking"),
    ("the chef stirred the soup on the stove", "cooking"),
    ("the laptop crashed after the software update", "tech"),
    ("she fixed a bug in the python code", "tech"),
    ("the server needs more memory and a faster cpu", "tech"),
    ("heavy rain is expected in the forecast", "weather"),
    ("a storm with strong wind hit the coast", "weather"),
    ("sunny skies and warm temperatures today", "weather"),
]
HELD_OUT = [
    ("the team won the game with a late goal", "sports"),
    ("the keeper caught the ball from the striker", "sports"),
    ("preheat the oven and bake the cake", "cooking"),
    ("the chef added flour and sugar to the soup", "cooking"),
    ("install the software update on your laptop", "tech"),
    ("a bug in the code crashed the server", "tech"),
    ("the forecast says heavy rain and wind", "weather"),
    ("strong wind and a storm on the coast tonight", "weather"),
]


def examples(rows: list[tuple[str, str]]) -> list[Any]:
    return [dspy.Example(sentence=s, topic=t).with_inputs("sentence") for s, t in rows]


def request(*messages: Any, system: str | None = None) -> Any:
    return Request(model="demo/fewshot", messages=tuple(messages), system=system)


# --- demo engine -------------------------------------------------------------------------------------


def test_labeled_few_shot_beats_no_demos_on_held_out_set() -> None:
    trainset, testset = examples(TRAIN), examples(HELD_OUT)
    program = dspy.Predict("sentence -> topic")
    evaluate = dspy.Evaluate(devset=testset, metric=get_metric("exact_match", "topic"), num_threads=2)
    with dspy.context(lm=demo_lm()):
        baseline = evaluate(program)
        compiled = dspy.LabeledFewShot(k=len(trainset)).compile(program, trainset=trainset)
        optimized = evaluate(compiled)
    print(f"held-out exact_match: no demos {baseline.score}%, LabeledFewShot(k={len(trainset)}) {optimized.score}%")
    assert baseline.score == 0.0
    assert all(prediction.topic == "unknown" for _, prediction, _ in baseline.results)
    assert optimized.score == 100.0
    assert len(compiled.demos) == len(trainset) and program.demos == []


def test_answers_with_nearest_demo_in_chat_adapter_format() -> None:
    program = dspy.Predict("question, context -> answer")
    program.demos = [
        dspy.Example(question="capital of france", context="europe", answer="Paris").with_inputs("question", "context"),
        dspy.Example(question="capital of japan", context="asia", answer="Tokyo").with_inputs("question", "context"),
    ]
    lm = demo_lm()
    with dspy.context(lm=lm):
        assert program(question="what is the capital of japan", context="asia").answer == "Tokyo"
        assert program(question="france capital city", context="europe").answer == "Paris"
        assert program(question="zzz", context="qqq").answer == "unknown"  # no shared word: fallback
    raw = lm.history[-3]["outputs"][0]
    assert raw.startswith("[[ ## answer ## ]]\nTokyo") and raw.rstrip().endswith("[[ ## completed ## ]]")


def test_no_demos_gives_a_parseable_fallback_for_every_typed_output() -> None:
    class Survey(dspy.Signature):
        """Summarize."""

        text: str = dspy.InputField()
        summary: str = dspy.OutputField()
        count: int = dspy.OutputField()
        ratio: float = dspy.OutputField()
        flagged: bool = dspy.OutputField()
        tags: list[str] = dspy.OutputField()

    with dspy.context(lm=demo_lm(fallback="n/a")):
        result = dspy.Predict(Survey)(text="anything")
    assert (result.summary, result.count, result.ratio, result.flagged, result.tags) == ("n/a", 0, 0.0, False, [])


def test_chain_of_thought_and_json_adapter_use_demo_outputs() -> None:
    class Sig(dspy.Signature):
        question: str = dspy.InputField()
        answer: str = dspy.OutputField()
        number: int = dspy.OutputField()

    program = dspy.ChainOfThought(Sig)
    program.predict.demos = [
        dspy.Example(question="how many legs has a spider", answer="eight", number=8).with_inputs("question"),
        dspy.Example(question="how many wheels has a bike", answer="two", number=2).with_inputs("question"),
    ]
    lm = demo_lm()
    with dspy.context(lm=lm):
        chat = program(question="legs on a spider")
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        as_json = program(question="wheels of a bike")
    assert (chat.answer, chat.number) == ("eight", 8)
    assert (as_json.answer, as_json.number) == ("two", 2)
    assert json.loads(lm.history[-1]["outputs"][0])["number"] == 2  # the JSONAdapter got JSON, not markers
    assert chat.reasoning == "unknown"  # demos supply no reasoning: the fallback fills it


async def test_async_engine_serves_acall() -> None:
    program = dspy.Predict("sentence -> topic")
    program.demos = examples(TRAIN)
    with dspy.context(lm=demo_lm()):
        results = [await program.acall(sentence=s) for s, _ in HELD_OUT[:4]]
    assert [r.topic for r in results] == [t for _, t in HELD_OUT[:4]]


def test_usage_is_reported_in_whitespace_tokens() -> None:
    engine = DemoFewShotEngine()
    response = engine.complete(request(Message.user("one two three"), system="alpha beta"))
    assert isinstance(response, Response)
    assert (response.usage.input_tokens, response.usage.output_tokens) == (5, 1)
    assert response.text == "unknown"  # no adapter prompt: no fields, just the fallback

    lm = demo_lm()
    with dspy.context(lm=lm, track_usage=True):
        prediction = dspy.Predict("sentence -> topic")(sentence="hello there")
    usage = prediction.get_lm_usage()["demo/fewshot"]
    entry = lm.history[-1]
    prompt_words = sum(len(str(m["content"]).split()) for m in entry["messages"])
    assert usage["prompt_tokens"] == prompt_words > 20
    assert usage["completion_tokens"] == len(entry["outputs"][0].split())


def test_engine_is_deterministic_and_streams_canonical_events() -> None:
    engine = DemoFewShotEngine()
    req = request(Message.user("[[ ## q ## ]]\nhi"), system="Your output fields are:\n1. `a` (str): \n")
    first, second = engine.complete(req), engine.complete(req)
    assert (first.id, first.text) == (second.id, second.text)
    events = list(engine.stream(req))
    assert [e.type for e in events] == ["start", "delta", "end"]
    assert events[1].delta.text == first.text


async def test_async_twin_matches_sync_engine() -> None:
    sync = DemoFewShotEngine()
    engine = AsyncDemoFewShotEngine(sync)
    req = request(Message.user("[[ ## q ## ]]\nhi"), system="Your output fields are:\n1. `a` (int): \n")
    response = await engine.complete(req)
    assert response.text == sync.complete(req).text == "[[ ## a ## ]]\n0\n\n[[ ## completed ## ]]"
    assert [e.type async for e in engine.stream(req)] == ["start", "delta", "end"]
    await engine.aclose()


def test_lm_with_demo_engine_saves_and_restores() -> None:
    state = demo_lm(fallback="none yet").dump_state()
    assert state["engine"]["class"] == "dspyrt.agents.lm.demo:DemoFewShotEngine"
    restored = dspy.LM.load_state(state, allow_custom_lm_class=True)
    with dspy.context(lm=restored):
        assert dspy.Predict("q -> a")(q="x").a == "none yet"


def test_demo_engine_accepts_response_format_requests_as_json() -> None:
    engine = DemoFewShotEngine()
    req = Request(
        model="demo/fewshot",
        messages=(Message.user("[[ ## q ## ]]\nhi"),),
        system="Your output fields are:\n1. `a` (str): \n2. `b` (Literal['x', 'y']): \n",
        config=Config(response_format={"type": "json_object"}),
    )
    assert json.loads(engine.complete(req).text) == {"a": "unknown", "b": "x"}


# --- fault injection ---------------------------------------------------------------------------------


def test_same_seed_same_faults_and_rates_near_configured() -> None:
    profile = FaultProfile(latency=UniformLatency(low=0.1, high=0.3), error_rate=0.2, rate_limit_rate=0.1, seed=7)
    first = [FaultInjector(profile).next_fault() for _ in range(1)]
    a, b = FaultInjector(profile), FaultInjector(profile)
    run_a = [a.next_fault() for _ in range(2000)]
    run_b = [b.next_fault() for _ in range(2000)]
    assert run_a == run_b and run_a[:1] == first
    other = FaultInjector(profile.model_copy(update={"seed": 8}))
    assert [other.next_fault() for _ in range(2000)] != run_a
    assert 300 <= a.stats.errors <= 500 and 120 <= a.stats.rate_limited <= 280
    assert all(0.1 <= f.delay <= 0.3 for f in run_a if f.outcome != "rate_limited")
    assert a.stats.calls == 2000


def test_latency_models_validate_and_cap() -> None:
    capped = FaultInjector(FaultProfile(latency=LogNormalLatency(median=1.0, sigma=2.0, max_seconds=1.5)))
    assert max(capped.next_fault().delay for _ in range(500)) == 1.5
    with pytest.raises(ValueError, match="low <= high"):
        UniformLatency(low=2, high=1)
    with pytest.raises(ValueError, match="at most 1"):
        FaultProfile(error_rate=0.7, rate_limit_rate=0.5)
    profile = FaultProfile.model_validate({"latency": {"kind": "lognormal", "median": 0.2}, "seed": 1})
    assert isinstance(profile.latency, LogNormalLatency)


def test_injected_errors_are_lm15_errors_and_dspy_failures() -> None:
    failing = FaultyEngine(DemoFewShotEngine(), FaultProfile(error_rate=1.0, retry_after=0.0))
    with pytest.raises(InjectedFaultError) as direct:
        failing.complete(request(Message.user("hi")))
    assert direct.value.status == 500

    lm = dspy.LM("demo/fewshot", engine=failing, cache=False, num_retries=0)
    with dspy.context(lm=lm), pytest.raises(LMServerError) as through_dspy:
        dspy.Predict("q -> a")(q="hi")
    assert isinstance(through_dspy.value.__cause__, InjectedFaultError)
    assert is_retryable_lm_error(through_dspy.value)

    limited = FaultyEngine(DemoFewShotEngine(), FaultProfile(rate_limit_rate=1.0, retry_after=0.0))
    lm = dspy.LM("demo/fewshot", engine=limited, cache=False, num_retries=0)
    with dspy.context(lm=lm), pytest.raises(LMRateLimitError) as rate_limited:
        dspy.Predict("q -> a")(q="hi")
    assert isinstance(rate_limited.value.__cause__, RateLimitedError)
    assert rate_limited.value.retry_after == 0.0


def test_dspy_retries_injected_failures_until_success() -> None:
    injector = FaultInjector(FaultProfile(error_rate=0.5, retry_after=0.0, seed=3))
    lm = dspy.LM("demo/fewshot", engine=FaultyEngine(DemoFewShotEngine(), injector), cache=False, num_retries=8)
    with dspy.context(lm=lm):
        answers = [dspy.Predict("q -> a")(q=str(i)).a for i in range(10)]
    assert answers == ["unknown"] * 10
    assert injector.stats.calls == 10 + injector.stats.errors and injector.stats.errors > 0


def test_requests_per_minute_window() -> None:
    now = [0.0]
    injector = FaultInjector(FaultProfile(requests_per_minute=3), clock=lambda: now[0])
    assert [injector.next_fault().outcome for _ in range(4)] == ["ok", "ok", "ok", "rate_limited"]
    now[0] = 61.0
    assert injector.next_fault().outcome == "ok"


def test_sync_latency_and_streaming_pass_through() -> None:
    engine = FaultyEngine(DemoFewShotEngine(), FaultProfile(latency=FixedLatency(seconds=0.02)))
    events = list(engine.stream(request(Message.user("hi"))))
    assert [e.type for e in events] == ["start", "delta", "end"]
    assert engine.injector.stats.delay_seconds == pytest.approx(0.02)
    engine.close()


async def test_async_latency_does_not_block_the_event_loop() -> None:
    injector = FaultInjector(FaultProfile(latency=FixedLatency(seconds=0.2), seed=1))
    engine = AsyncFaultyEngine(AsyncDemoFewShotEngine(), injector)
    ticks = 0
    responses: list[Any] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async def call() -> None:
        responses.append(await engine.complete(request(Message.user("hi"))))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        async with anyio.create_task_group() as calls:
            for _ in range(3):
                calls.start_soon(call)
        tg.cancel_scope.cancel()
    assert len(responses) == 3 and injector.stats.calls == 3
    assert ticks > 0  # the loop kept running while the calls waited
    assert [e.type async for e in engine.stream(request(Message.user("hi")))] == ["start", "delta", "end"]
    await engine.aclose()


async def test_async_faulty_engine_raises_through_acall() -> None:
    injector = FaultInjector(FaultProfile(rate_limit_rate=1.0, retry_after=0.0))
    lm = dspy.LM(
        "demo/fewshot",
        engine=FaultyEngine(DemoFewShotEngine(), injector),
        async_engine=AsyncFaultyEngine(AsyncDemoFewShotEngine(), injector),
        cache=False,
        num_retries=0,
    )
    with dspy.context(lm=lm), pytest.raises(LMRateLimitError):
        await dspy.Predict("q -> a").acall(q="hi")
    assert injector.stats.rate_limited == 1


# --- model registry ----------------------------------------------------------------------------------

SECRET = "sk-test-0123456789-SECRET"


def test_default_registry_builds_the_demo_lm() -> None:
    registry = ModelRegistry.default()
    spec = registry.get("demo/fewshot")
    assert spec.is_demo and "demo/fewshot" in registry and len(registry) == 1
    lm = build_lm(spec)
    assert isinstance(lm, dspy.LM) and lm.cache is False
    with dspy.context(lm=lm):
        assert dspy.Predict("q -> a")(q="x").a == "unknown"


def test_toml_registry_real_provider_is_one_line_and_key_comes_from_env(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        """
[[models]]
model = "openai/gpt-4o-mini"
api_key_env = "DSPYRT_TEST_OPENAI_KEY"
input_cost_per_million = 0.15
output_cost_per_million = 0.60
tags = ["fast", "classification"]

[[models]]
model = "demo/fewshot"
tags = ["test"]
"""
    )
    registry = ModelRegistry.from_toml(path)
    spec = registry.get("openai/gpt-4o-mini")
    assert [s.model for s in registry.with_tag("fast")] == ["openai/gpt-4o-mini"]
    assert spec.cost(1_000_000, 2_000_000) == pytest.approx(0.15 + 1.20)

    lm = build_lm(spec, environ={"DSPYRT_TEST_OPENAI_KEY": SECRET})
    assert isinstance(lm, dspy.LM) and lm.model == "openai/gpt-4o-mini"
    assert lm.kwargs["api_key"] == SECRET
    for shown in (repr(spec), str(spec), spec.model_dump_json(), json.dumps(lm.dump_state()), repr(registry)):
        assert SECRET not in shown

    with pytest.raises(ConfigurationError, match="DSPYRT_TEST_OPENAI_KEY") as missing:
        build_lm(spec, environ={})
    assert missing.value.code == "invalid_config"


def test_registry_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"unknown model 'openai/nope'; known: demo/fewshot") as unknown:
        ModelRegistry.default().get("openai/nope")
    assert unknown.value.code == "not_found"

    bad = tmp_path / "bad.toml"
    bad.write_text("[[models]\nmodel = 'x'\n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        ModelRegistry.from_toml(bad)
    with pytest.raises(ConfigurationError, match="does not exist"):
        ModelRegistry.from_toml(tmp_path / "missing.toml")

    invalid = tmp_path / "invalid.toml"
    invalid.write_text("[[models]]\nmodel = 'openai/x'\ninput_cost_per_million = -1\n")
    with pytest.raises(ConfigurationError, match=r"models\[0\].*input_cost_per_million"):
        ModelRegistry.from_toml(invalid)

    with pytest.raises(ValueError, match="provider/name"):
        ModelSpec(model="openai/")

    with pytest.raises(ConfigurationError, match="configured twice"):
        ModelRegistry.from_mapping({"models": [{"model": "demo/fewshot"}, {"model": "demo/fewshot"}]})


def test_keys_are_refused_in_configuration_and_never_echoed() -> None:
    with pytest.raises(ConfigurationError, match="api_key_env") as inline:
        ModelRegistry.from_mapping({"models": [{"model": "openai/x", "api_key": SECRET}]})
    assert SECRET not in str(inline.value)
    with pytest.raises(ConfigurationError, match="api_key_env") as pasted:  # a key where the variable name goes
        ModelRegistry.from_mapping({"models": [{"model": "openai/x", "api_key_env": SECRET}]})
    assert SECRET not in str(pasted.value)


def test_public_surface_is_pinned() -> None:

    assert lm_package.__all__ == sorted(lm_package.__all__, key=lambda name: (not name.isupper(), name))
    assert set(lm_package.__all__) == {
        "DEMO_MODEL",
        "AsyncDemoFewShotEngine",
        "AsyncFaultyEngine",
        "DemoFewShotEngine",
        "Fault",
        "FaultInjector",
        "FaultProfile",
        "FaultStats",
        "FaultyEngine",
        "FixedLatency",
        "InjectedFaultError",
        "LogNormalLatency",
        "ModelRegistry",
        "ModelSpec",
        "RateLimitedError",
        "UniformLatency",
        "build_lm",
        "demo_lm",
    }
