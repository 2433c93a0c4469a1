"""The system's own LM response cache: keyed by model and the full request, shared by every switcher replica.

DSPy's caches are turned off in every agent process (:func:`disable_dspy_cache`): DSPy's disk cache lives in the
home folder of whichever machine ran the call, answers without telling anyone, and made a ``no_cache`` task report
80 "calls" that never reached the provider. Here the switcher owns the cache instead: an in-process LRU in front of
a JetStream KV bucket (so a fleet of switchers shares it) with a TTL and a size limit from configuration. Only
successful replies are stored; every answer says whether it came from the provider or from here.

The key covers everything that shapes the answer: the model string, the model's configured temperature and
max_tokens, the messages, the request's temperature and max_tokens, and ``sample`` — the n-th identical request
of one run with a temperature above 0 (DSPy's ``rollout_id``), so optimizers that sample the same prompt several
times get several answers, and a repeated run gets the same ones again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

log = logging.getLogger("dspyrt.switcher")


class CachedResponse(BaseModel):
    """What is kept of one provider reply: enough to answer the same request again."""

    model: str
    text: str
    finish_reason: str = "stop"
    input_tokens: int = 0
    output_tokens: int = 0


class ResponseStore(Protocol):
    """Where cached replies live beyond one process (a KV bucket in the agent; nothing in a unit test)."""

    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes) -> None: ...


def cache_key(model: str, model_settings: dict[str, Any], request: dict[str, Any]) -> str:
    """A stable hex digest of the model, its settings and the request fields that shape the answer."""
    material = {"model": model, "settings": model_settings, "request": request}
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """An LRU of ``memory_entries`` replies in front of an optional shared store; counts hits and misses.

    A store that fails (the bus is down, the bucket is full) is logged and treated as a miss: the cache may only
    ever save a call, never fail one.
    """

    def __init__(self, store: ResponseStore | None = None, *, memory_entries: int = 10_000) -> None:
        self.store = store
        self.memory_entries = memory_entries
        self._memory: OrderedDict[str, CachedResponse] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.writes = 0

    async def get(self, key: str) -> CachedResponse | None:
        with self._lock:
            found = self._memory.get(key)
            if found is not None:
                self._memory.move_to_end(key)
                self.hits += 1
                return found
        raw: bytes | None = None
        if self.store is not None:
            try:
                raw = await self.store.get(key)
            except Exception as exc:
                log.warning("LM cache read failed (%s: %s); calling the provider", type(exc).__name__, exc)
        if raw:
            try:
                found = CachedResponse.model_validate_json(raw)
            except ValidationError:
                found = None  # written by another version, or damaged: a miss, overwritten by the next reply
        with self._lock:
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._remember(key, found)
        return found

    async def put(self, key: str, response: CachedResponse) -> None:
        with self._lock:
            self._remember(key, response)
            self.writes += 1
        if self.store is not None:
            try:
                await self.store.put(key, response.model_dump_json().encode())
            except Exception as exc:
                log.warning("LM cache write failed (%s: %s)", type(exc).__name__, exc)

    def _remember(self, key: str, response: CachedResponse) -> None:
        self._memory[key] = response
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()


_dspy_cache_off = threading.Lock()
_dspy_cache_done = False


def disable_dspy_cache() -> None:
    """Turn DSPy's own response caches (memory and the disk cache in the home folder) off in this process.

    Called wherever an agent builds a ``dspy.LM``; idempotent. The switcher's cache is the only one."""
    global _dspy_cache_done
    with _dspy_cache_off:
        if _dspy_cache_done:
            return
        import dspy

        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
        _dspy_cache_done = True
