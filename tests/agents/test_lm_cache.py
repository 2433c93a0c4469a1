"""The switcher's LM response cache in the ModelSwitcher core (no bus): hits, bypass, samples, a failing store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from dspyrt.agents.lm.cache import CachedResponse, ResponseCache
from dspyrt.agents.switcher.core import ModelLike, ModelSwitcher
from dspyrt.agents.switcher.models import ChatMessage, CompletionReply, CompletionRequest, TokenUsage

pytestmark = pytest.mark.timeout(10)


@dataclass(frozen=True)
class Model:
    model: str
    tags: tuple[str, ...] = ()
    max_concurrency: int = 4
    rate_limit_per_minute: int | None = None
    input_cost_per_million: float = 1.0
    output_cost_per_million: float = 2.0
    temperature: float | None = None
    max_tokens: int | None = None

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_cost_per_million + output_tokens * self.output_cost_per_million) / 1e6


class CountingCaller:
    """Answers with a numbered text, so a repeated answer can only have come from the cache."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, model: ModelLike, req: CompletionRequest) -> CompletionReply:
        self.calls += 1
        return CompletionReply(
            model=model.model, text=f"answer {self.calls}", usage=TokenUsage(input_tokens=100, output_tokens=10)
        )


class DictStore:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    async def put(self, key: str, value: bytes) -> None:
        self.data[key] = value


class BrokenStore:
    async def get(self, key: str) -> bytes | None:
        raise ConnectionError("bus down")

    async def put(self, key: str, value: bytes) -> None:
        raise ConnectionError("bus down")


def request(text: str = "hi", **fields: Any) -> CompletionRequest:
    return CompletionRequest(messages=[ChatMessage(role="user", content=text)], model="p/m", **fields)


async def test_a_repeated_request_is_answered_from_the_cache_at_no_cost() -> None:
    caller = CountingCaller()
    switcher = ModelSwitcher([Model("p/m")], caller, cache=ResponseCache(DictStore()))
    first = await switcher.complete(request())
    again = await switcher.complete(request())
    assert (first.cached, first.attempts, first.cost > 0) == (False, 1, True)
    assert (again.text, again.cached, again.cost, again.usage.input_tokens, again.attempts) == (
        first.text,
        True,
        0.0,
        0,
        0,
    )
    assert caller.calls == 1
    assert switcher.stats["p/m"].cache_hits == 1 and switcher.stats["p/m"].calls == 1
    # A different prompt, temperature or sample is another entry.
    await switcher.complete(request("other"))
    await switcher.complete(request(temperature=0.7))
    await switcher.complete(request(temperature=0.7, sample=1))
    assert caller.calls == 4


async def test_no_cache_calls_the_provider_and_refreshes_the_entry() -> None:
    caller = CountingCaller()
    switcher = ModelSwitcher([Model("p/m")], caller, cache=ResponseCache(DictStore()))
    await switcher.complete(request())
    fresh = await switcher.complete(request(no_cache=True))
    assert (fresh.cached, fresh.text, caller.calls) == (False, "answer 2", 2)
    assert (await switcher.complete(request())).text == "answer 2"


async def test_the_shared_store_serves_another_switcher() -> None:
    store = DictStore()
    first = ModelSwitcher([Model("p/m")], CountingCaller(), cache=ResponseCache(store))
    await first.complete(request())
    caller = CountingCaller()
    second = ModelSwitcher([Model("p/m")], caller, cache=ResponseCache(store))
    reply = await second.complete(request())
    assert (reply.cached, reply.text, caller.calls) == (True, "answer 1", 0)


async def test_a_failing_store_never_fails_a_call() -> None:
    caller = CountingCaller()
    cache = ResponseCache(BrokenStore(), memory_entries=0)
    switcher = ModelSwitcher([Model("p/m")], caller, cache=cache)
    await switcher.complete(request())
    reply = await switcher.complete(request())
    assert (reply.cached, caller.calls, cache.misses) == (False, 2, 2)


async def test_the_memory_lru_keeps_the_newest_entries() -> None:
    cache = ResponseCache(None, memory_entries=2)
    for key in ("a", "b", "c"):
        await cache.put(key, CachedResponse(model="p/m", text=key))
    assert await cache.get("a") is None
    assert [(await cache.get(k)).text for k in ("b", "c")] == ["b", "c"]  # type: ignore[union-attr]


async def test_a_changed_model_setting_is_another_key() -> None:
    switcher = ModelSwitcher([Model("p/m")], CountingCaller())
    cooler = ModelSwitcher([Model("p/m", temperature=0.0)], CountingCaller())
    assert switcher.cache_key(Model("p/m"), request()) != cooler.cache_key(Model("p/m", temperature=0.0), request())
