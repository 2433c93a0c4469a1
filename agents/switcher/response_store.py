"""The shared half of the switcher's response cache: a KV bucket every switcher replica reads and writes.

``dspyrt.agents.lm.cache.ResponseCache`` keeps an LRU in front of it; the bucket's TTL and size limit (set where
the switcher opens it) drop the oldest entries first.
"""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue


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
