"""ModelSwitcher tested directly with a stub model caller (no bus): telemetry failures, pinned models, backoff."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from dspy import lm15
from dspy.utils.exceptions import LMRateLimitError

from dspyrt.agents.lm.errors import AllModelsFailedError, ProviderError, RateLimitedError
from dspyrt.agents.lm.faults import FaultProfile
from dspyrt.agents.lm.registry import ModelRegistry, ModelSpec
from dspyrt.agents.switcher import core as switcher_core
from dspyrt.agents.switcher.caller import DspyModelCaller
from dspyrt.agents.switcher.core import ModelLike, ModelSwitcher
from dspyrt.agents.switcher.models import ChatMessage, CompletionReply, CompletionRequest, SelectRequest, TokenUsage

pytestmark = pytest.mark.timeout(30)


@dataclass(frozen=True)
class Model:
    model: str
    tags: tuple[str, ...] = ()
    max_concurrency: int = 1
    rate_limit_per_minute: int | None = None
    input_cost_per_million: float = 10.0
    output_cost_per_million: float = 10.0
    temperature: float | None = None
    max_tokens: int | None = None

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_cost_per_million + output_tokens * self.output_cost_per_million) / 1e6


class StubCaller:
    """Answers every call, or raises ``fail`` for the models named in ``failing``; counts calls per model."""

    def __init__(self, fail: Exception | None = None, failing: tuple[str, ...] = ()) -> None:
        self.fail = fail
        self.failing = failing
        self.calls: list[str] = []

    async def __call__(self, model: ModelLike, req: CompletionRequest) -> CompletionReply:
        self.calls.append(model.model)
        if self.fail is not None and model.model in self.failing:
            raise self.fail
        return CompletionReply(model=model.model, text="ok", usage=TokenUsage(input_tokens=3, output_tokens=2))


def request(**fields: Any) -> CompletionRequest:
    return CompletionRequest(messages=[ChatMessage(role="user", content="hi")], **fields)


class ConnectionClosedError(Exception):
    """Named like the NATS client's error, so ``is_transient`` would take it for a retryable one."""


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every ``anyio.sleep`` the switcher makes, recorded instead of slept."""
    recorded: list[float] = []

    async def fake_sleep(delay: float) -> None:
        recorded.append(delay)

    monkeypatch.setattr(anyio, "sleep", fake_sleep)
    return recorded


# --------------------------------------------------------------------------- telemetry is not the call


async def test_failed_report_keeps_the_successful_reply(caplog: pytest.LogCaptureFixture) -> None:
    caller = StubCaller()

    async def on_call(model: str, reply: CompletionReply | None, error: str | None) -> None:
        raise ConnectionClosedError("nats: connection closed")

    switcher = ModelSwitcher([Model("a/x"), Model("b/y")], caller, on_call=on_call)
    with caplog.at_level(logging.WARNING):
        reply = await switcher.complete(request(model="a/x"))
    assert (reply.model, reply.text, reply.tried) == ("a/x", "ok", ["a/x"])
    assert caller.calls == ["a/x"]
    assert switcher.stats["a/x"].successes == 1
    assert "ConnectionClosedError" in caplog.text


async def test_failed_report_of_a_failure_keeps_the_retry_decision(sleeps: list[float]) -> None:
    caller = StubCaller(fail=ValueError("bad request"), failing=("a/x",))

    async def on_call(model: str, reply: CompletionReply | None, error: str | None) -> None:
        raise ConnectionClosedError("nats: connection closed")

    switcher = ModelSwitcher([Model("a/x"), Model("b/y")], caller, on_call=on_call, fallback={"a/x": ["b/y"]})
    with pytest.raises(ProviderError) as info:
        await switcher.complete(request(model="a/x"))
    # A permanent failure is neither retried nor handed to the fallback, whatever the report did: it fails now.
    assert caller.calls == ["a/x"]
    assert info.value.code == "provider_error" and "bad request" in info.value.message
    assert sleeps == []


async def test_report_runs_outside_the_concurrency_limit() -> None:
    caller = StubCaller(fail=ValueError("bad request"), failing=("a/x",))
    switcher = ModelSwitcher([Model("a/x", max_concurrency=1)], caller, retries=0)
    borrowed: list[float] = []

    async def on_call(model: str, reply: CompletionReply | None, error: str | None) -> None:
        borrowed.append(switcher._limits[model].borrowed_tokens)

    switcher.on_call = on_call
    with pytest.raises(ProviderError):
        await switcher.complete(request(model="a/x"))
    switcher.caller = StubCaller()
    await switcher.complete(request(model="a/x"))
    assert borrowed == [0, 0]


# ----------------------------------------------------------------------------- a pinned model is tried


async def test_pinned_model_is_tried_when_no_other_model_matches_the_budget() -> None:
    caller = StubCaller()
    switcher = ModelSwitcher([Model("a/x"), Model("b/y")], caller)
    reply = await switcher.complete(request(model="a/x", max_price_per_million=1))
    assert (reply.model, reply.tried, caller.calls) == ("a/x", ["a/x"], ["a/x"])


async def test_pinned_model_is_tried_when_no_model_has_the_tags() -> None:
    caller = StubCaller()
    switcher = ModelSwitcher([Model("a/x"), Model("b/y")], caller)
    reply = await switcher.complete(request(model="a/x", tags=["vision"]))
    assert (reply.model, caller.calls) == ("a/x", ["a/x"])


async def test_pinned_model_falls_back_along_its_declared_chain_whatever_the_rules(sleeps: list[float]) -> None:
    caller = StubCaller(fail=ConnectionError("refused"), failing=("a/x", "b/y"))
    models: list[ModelLike] = [
        Model("a/x"),
        Model("b/y"),
        Model("c/z", input_cost_per_million=0.5, output_cost_per_million=0.5),
    ]
    switcher = ModelSwitcher(models, caller, retries=0, fallback={"a/x": ["b/y", "c/z"]})
    # No model but c/z fits the budget and none has the tag: the declared chain is tried all the same, in order.
    reply = await switcher.complete(request(model="a/x", max_price_per_million=1, tags=["vision"]))
    assert (reply.model, reply.tried, caller.calls) == ("c/z", ["a/x", "b/y", "c/z"], ["a/x", "b/y", "c/z"])


async def test_pinned_model_without_a_declared_chain_does_not_fall_back(sleeps: list[float]) -> None:
    caller = StubCaller(fail=ConnectionError("refused"), failing=("a/x",))
    switcher = ModelSwitcher([Model("a/x"), Model("b/y")], caller, retries=1)
    with pytest.raises(AllModelsFailedError) as info:
        await switcher.complete(request(model="a/x"))
    assert caller.calls == ["a/x", "a/x"]
    assert "after 2 attempt(s)" in info.value.message and "refused" in info.value.message


async def test_fallback_false_keeps_to_the_first_model(sleeps: list[float]) -> None:
    caller = StubCaller(fail=ConnectionError("refused"), failing=("a/x",))
    switcher = ModelSwitcher([Model("a/x"), Model("b/y")], caller, retries=0, fallback={"a/x": ["b/y"]})
    with pytest.raises(AllModelsFailedError):
        await switcher.complete(request(model="a/x", fallback=False))
    assert caller.calls == ["a/x"]


async def test_unpinned_request_without_a_chain_falls_back_by_rank(sleeps: list[float]) -> None:
    caller = StubCaller(fail=ConnectionError("refused"), failing=("a/x",))
    cheap = Model("a/x", input_cost_per_million=1, output_cost_per_million=1)
    switcher = ModelSwitcher([cheap, Model("b/y")], caller, retries=0)
    reply = await switcher.complete(request())
    assert (reply.model, reply.tried) == ("b/y", ["a/x", "b/y"])


def test_select_names_the_fallback_chain() -> None:
    switcher = ModelSwitcher([Model("a/x"), Model("b/y")], StubCaller(), fallback={"a/x": ["b/y"], "b/y": []})
    selection = switcher.select(SelectRequest())
    assert selection.model == "a/x" and selection.fallback == ["b/y"]
    assert "falls back to b/y" in selection.reason


async def test_unpinned_request_with_no_eligible_model_still_refused() -> None:
    switcher = ModelSwitcher([Model("a/x")], StubCaller())
    with pytest.raises(switcher_core.NoEligibleModelError):
        await switcher.complete(request(max_price_per_million=1))


# ------------------------------------------------------------------------------- rate-limit backoff


async def test_rate_limit_sleeps_only_before_another_attempt_on_the_same_model(sleeps: list[float]) -> None:
    caller = StubCaller(fail=RateLimitedError("a/x is rate limited"), failing=("a/x",))
    switcher = ModelSwitcher(
        [Model("a/x"), Model("b/y")], caller, retries=2, retry_backoff=0.2, fallback={"a/x": ["b/y"]}
    )
    reply = await switcher.complete(request(model="a/x"))
    assert reply.model == "b/y"
    assert caller.calls == ["a/x", "a/x", "a/x", "b/y"]
    # Three attempts on a/x, two waits between them (the existing backoff), none before moving to b/y.
    assert sleeps == [0.2, 0.4]


async def test_rate_limit_waits_the_retry_after_hint(sleeps: list[float]) -> None:
    caller = StubCaller(fail=RateLimitedError("a/x is rate limited", delay=1.5), failing=("a/x", "b/y"))
    switcher = ModelSwitcher(
        [Model("a/x"), Model("b/y")], caller, retries=1, retry_backoff=0.2, fallback={"a/x": ["b/y"]}
    )
    with pytest.raises(AllModelsFailedError):
        await switcher.complete(request(model="a/x"))
    assert caller.calls == ["a/x", "a/x", "b/y", "b/y"]
    assert sleeps == [1.5, 1.5]


async def test_a_retry_after_hint_longer_than_the_cap_moves_on_to_the_next_model(sleeps: list[float]) -> None:
    hint = switcher_core.MAX_RETRY_AFTER + 1
    caller = StubCaller(fail=RateLimitedError("a/x is rate limited", delay=hint), failing=("a/x",))
    switcher = ModelSwitcher(
        [Model("a/x"), Model("b/y")], caller, retries=2, retry_backoff=0.2, fallback={"a/x": ["b/y"]}
    )
    assert (await switcher.complete(request(model="a/x"))).model == "b/y"
    assert caller.calls == ["a/x", "b/y"]
    assert sleeps == []


async def test_rate_limit_with_no_retries_never_sleeps(sleeps: list[float]) -> None:
    caller = StubCaller(fail=RateLimitedError("rate limited"), failing=("a/x",))
    switcher = ModelSwitcher([Model("a/x"), Model("b/y")], caller, retries=0, fallback={"a/x": ["b/y"]})
    assert (await switcher.complete(request(model="a/x"))).model == "b/y"
    assert sleeps == []


async def test_demo_rate_limit_carries_retry_after() -> None:
    profile = FaultProfile(rate_limit_rate=1.0, retry_after=7.0)
    spec = ModelSpec(model="demo/limited", faults=profile)
    caller = DspyModelCaller(ModelRegistry([spec]))
    with pytest.raises(RateLimitedError) as info:
        await caller(spec, request())
    assert info.value.delay == 7.0


@pytest.mark.parametrize(
    ("error", "delay"),
    [
        (LMRateLimitError("slow down", model="openai/x", retry_after=3.0), 3.0),
        (LMRateLimitError("slow down", model="openai/x"), None),
        (lm15.RateLimitError("slow down", retry_after=2.0), 2.0),
    ],
)
async def test_provider_rate_limit_carries_retry_after(
    monkeypatch: pytest.MonkeyPatch, error: Exception, delay: float | None
) -> None:
    spec = ModelSpec(model="openai/x")
    caller = DspyModelCaller(ModelRegistry([spec]))

    class RefusingLM:
        async def aforward(self, **_: Any) -> Any:
            raise error

    monkeypatch.setattr(caller, "lm", lambda _: RefusingLM())
    with pytest.raises(RateLimitedError) as info:
        await caller(spec, request())
    assert info.value.delay == delay


async def test_wrapped_rate_limit_hint_is_found_down_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(model="openai/x")
    caller = DspyModelCaller(ModelRegistry([spec]))

    class RefusingLM:
        async def aforward(self, **_: Any) -> Any:
            try:
                raise lm15.RateLimitError("slow down", retry_after=4.0)
            except lm15.RateLimitError as exc:
                raise LMRateLimitError("slow down", model="openai/x") from exc

    monkeypatch.setattr(caller, "lm", lambda _: RefusingLM())
    with pytest.raises(RateLimitedError) as info:
        await caller(spec, request())
    assert info.value.delay == 4.0
