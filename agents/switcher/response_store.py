"""The shared half of the switcher's response cache: a KV bucket every switcher replica reads and writes.

``dspyrt.agents.lm.cache.ResponseCache`` keeps an LRU in front of it; the bucket's TTL and size limit (set where
the switcher opens it) drop the oldest entries first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from dspyrt.agents.lm.cache import ResponseStore


class KvResponseStore:
    """The shared half of the response cache: a KV bucket (TTL and size limit; the oldest entries go first)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, key: str) -> bytes | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return entry.value

    async def put(self, key: str, value: bytes) -> None:
        await self.kv.put(key, value)


class DeferredStore:
    """A store whose writes go to ``defer`` (run after the reply) instead of being awaited; reads pass through.

    A failed write is logged by ``defer`` and lost, as :class:`~dspyrt.agents.lm.cache.ResponseCache` treats it
    inline."""

    def __init__(self, store: ResponseStore, defer: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]) -> None:
        self.store = store
        self.defer = defer

    async def get(self, key: str) -> bytes | None:
        return await self.store.get(key)

    async def put(self, key: str, value: bytes) -> None:
        await self.defer(partial(self.store.put, key, value))
