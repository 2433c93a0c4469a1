"""Fault injection for LM engines: latency, provider errors and rate limits, reproducible with a seed.

Wrap any DSPy 3.4 engine (sync) with :class:`FaultyEngine` or any async engine with
:class:`AsyncFaultyEngine`; both take a :class:`FaultProfile` (the options) or a shared
:class:`FaultInjector` (the seeded decision source, so a sync/async pair draws from one sequence)::

    injector = FaultInjector(FaultProfile(latency=LogNormalLatency(median=0.2, sigma=0.5), error_rate=0.1, seed=7))
    lm = dspy.LM("demo/fewshot", engine=FaultyEngine(engine, injector),
                 async_engine=AsyncFaultyEngine(async_engine, injector), cache=False)

Injected failures are lm15 errors, the kind DSPy's engine contract expects: :class:`InjectedFaultError`
is a ``dspy.lm15.ServerError`` (HTTP 500) and :class:`RateLimitedError` a ``dspy.lm15.RateLimitError``
(HTTP 429, with ``retry_after``). Called through ``dspy.LM`` they surface as ``LMServerError`` /
``LMRateLimitError`` (the injected error is the ``__cause__``), which DSPy treats as retryable failures.

Determinism: each call draws its latency and its outcome from one ``random.Random(seed)`` in call order,
so the same sequence of calls sees the same faults. Concurrent callers share the sequence in arrival order.
Sync latency blocks the calling thread (``time.sleep``); async latency is ``anyio.sleep``.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from dspy import lm15
from pydantic import BaseModel, ConfigDict, Field, model_validator


class InjectedFaultError(lm15.ServerError):  # type: ignore[misc]
    """An injected provider failure (HTTP 500); DSPy reports it as ``LMServerError``."""


class RateLimitedError(lm15.RateLimitError):  # type: ignore[misc]
    """An injected rate limit (HTTP 429); DSPy reports it as ``LMRateLimitError``."""


class FixedLatency(BaseModel):
    """The same delay on every call."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["fixed"] = "fixed"
    seconds: float = Field(default=0.0, ge=0)

    def sample(self, rng: random.Random) -> float:
        return self.seconds


class UniformLatency(BaseModel):
    """A delay drawn uniformly from ``[low, high]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["uniform"] = "uniform"
    low: float = Field(ge=0)
    high: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> UniformLatency:
        if self.high < self.low:
            raise ValueError("uniform latency needs low <= high")
        return self

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)


class LogNormalLatency(BaseModel):
    """A long-tailed delay, like real LM APIs: lognormal with this median and shape, capped at ``max_seconds``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["lognormal"] = "lognormal"
    median: float = Field(gt=0)
    sigma: float = Field(default=0.5, ge=0)
    max_seconds: float | None = Field(default=None, gt=0)

    def sample(self, rng: random.Random) -> float:
        value = rng.lognormvariate(math.log(self.median), self.sigma)
        return min(value, self.max_seconds) if self.max_seconds is not None else value


Latency = Annotated[FixedLatency | UniformLatency | LogNormalLatency, Field(discriminator="kind")]


class FaultProfile(BaseModel):
    """What to inject.

    ``error_rate`` and ``rate_limit_rate`` are per-call probabilities (their sum at most 1).
    ``requests_per_minute`` additionally enforces a sliding one-minute window, the way a provider
    does: calls beyond it are rate-limited. ``retry_after`` is the hint carried by injected errors
    (DSPy's retry loop waits that long; ``None`` leaves DSPy's own backoff).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    latency: Latency = FixedLatency()
    error_rate: float = Field(default=0.0, ge=0, le=1)
    rate_limit_rate: float = Field(default=0.0, ge=0, le=1)
    requests_per_minute: int | None = Field(default=None, gt=0)
    retry_after: float | None = Field(default=None, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _rates(self) -> FaultProfile:
        if self.error_rate + self.rate_limit_rate > 1:
            raise ValueError("error_rate + rate_limit_rate must be at most 1")
        return self


Outcome = Literal["ok", "error", "rate_limited"]


@dataclass(frozen=True)
class Fault:
    """One call's fate: how long it waits, then whether it succeeds."""

    delay: float
    outcome: Outcome


@dataclass(frozen=True)
class FaultStats:
    """Counters since the injector was made."""

    calls: int = 0
    errors: int = 0
    rate_limited: int = 0
    delay_seconds: float = 0.0


class FaultInjector:
    """The seeded source of faults; thread-safe, shareable between a sync and an async engine.

    ``clock`` (seconds, monotonic) drives the ``requests_per_minute`` window; tests may pass a fake one.
    """

    def __init__(self, profile: FaultProfile, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.profile = profile
        self._rng = random.Random(profile.seed)
        self._lock = threading.Lock()
        self._clock = clock
        self._window: deque[float] = deque()
        self._stats = FaultStats()

    @property
    def stats(self) -> FaultStats:
        with self._lock:
            return self._stats

    def next_fault(self) -> Fault:
        """Draw the next call's fault. Both draws happen on every call, so the sequence never shifts."""
        profile = self.profile
        with self._lock:
            delay = profile.latency.sample(self._rng)
            draw = self._rng.random()
            outcome: Outcome = "ok"
            if draw < profile.rate_limit_rate or self._window_full():
                outcome = "rate_limited"
                delay = 0.0  # providers answer 429 at once
            elif draw < profile.rate_limit_rate + profile.error_rate:
                outcome = "error"
            if outcome != "rate_limited" and profile.requests_per_minute is not None:
                self._window.append(self._clock())
            s = self._stats
            self._stats = FaultStats(
                calls=s.calls + 1,
                errors=s.errors + (outcome == "error"),
                rate_limited=s.rate_limited + (outcome == "rate_limited"),
                delay_seconds=s.delay_seconds + delay,
            )
            return Fault(delay, outcome)

    def _window_full(self) -> bool:
        limit = self.profile.requests_per_minute
        if limit is None:
            return False
        now = self._clock()
        while self._window and self._window[0] <= now - 60.0:
            self._window.popleft()
        return len(self._window) >= limit

    def raise_for(self, fault: Fault) -> None:
        """Raise the injected error for a failed call (after its latency has passed)."""
        if fault.outcome == "rate_limited":
            raise RateLimitedError(
                "injected rate limit", provider="faults", status=429, retry_after=self.profile.retry_after
            )
        if fault.outcome == "error":
            raise InjectedFaultError(
                "injected provider failure", provider="faults", status=500, retry_after=self.profile.retry_after
            )


def _injector(faults: FaultProfile | FaultInjector) -> FaultInjector:
    return faults if isinstance(faults, FaultInjector) else FaultInjector(faults)


class FaultyEngine:
    """A sync engine that adds the injector's latency and failures in front of ``inner``."""

    def __init__(self, inner: Any, faults: FaultProfile | FaultInjector) -> None:
        self.inner = inner
        self.injector = _injector(faults)

    def _before(self) -> None:
        fault = self.injector.next_fault()
        if fault.delay > 0:
            time.sleep(fault.delay)
        self.injector.raise_for(fault)

    def complete(self, request: lm15.Request) -> lm15.Response:
        """Wait, maybe fail, then delegate to the wrapped engine."""
        self._before()
        response: lm15.Response = self.inner.complete(request)
        return response

    def stream(self, request: lm15.Request) -> Iterator[Any]:
        """Faults strike before the first event, as a failed HTTP call would."""
        self._before()
        yield from self.inner.stream(request)

    def close(self) -> None:
        """Close the wrapped engine."""
        self.inner.close()


class AsyncFaultyEngine:
    """The async twin of :class:`FaultyEngine`: its latency is ``anyio.sleep``, never a blocking sleep."""

    def __init__(self, inner: Any, faults: FaultProfile | FaultInjector) -> None:
        self.inner = inner
        self.injector = _injector(faults)

    async def _before(self) -> None:
        fault = self.injector.next_fault()
        if fault.delay > 0:
            await anyio.sleep(fault.delay)
        self.injector.raise_for(fault)

    async def complete(self, request: lm15.Request) -> lm15.Response:
        """Wait, maybe fail, then delegate to the wrapped async engine."""
        await self._before()
        response: lm15.Response = await self.inner.complete(request)
        return response

    async def stream(self, request: lm15.Request) -> AsyncIterator[Any]:
        """Faults strike before the first event."""
        await self._before()
        async for event in self.inner.stream(request):
            yield event

    async def aclose(self) -> None:
        """Close the wrapped async engine."""
        await self.inner.aclose()
