"""The guide's ModelSwitcher, in plain Python: model selection, the LM call with limits, retries and fallback,
and per-model performance figures. Its messages live in ``dspyrt.agents.switcher.models``;
``dspyrt.agents.switcher.agent`` puts it on the bus.

Selection is a UCB1 bandit over the eligible models. A call's reward is its success, discounted by its latency
and cost relative to the other candidates; a model never tried yet gets the exploration bonus first, so every
eligible model is measured before the figures decide. Rules come first: required tags filter, a model tagged
with the task kind or role is preferred to an untagged one, and a budget caps the price per million tokens.

Fallback is explicit and independent of the rules: after the first model, the models its ``fallback`` list (or
the models file's default chain) names are tried in order. A request that did not pin a model and has no declared
chain falls back through the other eligible models by rank. A request may forbid fallback (``fallback=False``).
Failures follow one taxonomy (``dspyrt.agents.lm.errors``): rate limits wait, transient failures are retried with
backoff
and then fall back, permanent ones fail the call at once. The response cache (``dspyrt.agents.lm.cache``) answers a
request it has seen before without calling the provider, unless the request says ``no_cache``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from dspyrt.agents.lm.cache import CachedResponse, ResponseCache, cache_key
from dspyrt.agents.lm.errors import AllModelsFailedError, ProviderError, classify
from dspyrt.agents.switcher.models import (
    CandidateScore,
    CompletionReply,
    CompletionRequest,
    ModelFigures,
    Selection,
    SelectRequest,
)
from dspyrt.bus import DspyrtError
from dspyrt.runtime.stats import percentile

log = logging.getLogger("dspyrt.switcher")

# A rate-limited model is waited for at most this long (its retry-after hint can be minutes).
MAX_RETRY_AFTER = 30.0


class ModelLike(Protocol):
    """What the switcher needs to know about a model (``dspyrt.agents.lm.registry.ModelSpec`` satisfies it)."""

    @property
    def model(self) -> str: ...
    @property
    def tags(self) -> tuple[str, ...]: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def rate_limit_per_minute(self) -> int | None: ...
    @property
    def input_cost_per_million(self) -> float: ...
    @property
    def output_cost_per_million(self) -> float: ...
    @property
    def temperature(self) -> float | None: ...
    @property
    def max_tokens(self) -> int | None: ...
    def cost(self, input_tokens: int, output_tokens: int) -> float: ...


def price_per_million(model: ModelLike) -> float:
    """One price to compare models by: the mean of the input and output price per million tokens."""
    return (model.input_cost_per_million + model.output_cost_per_million) / 2


class NoEligibleModelError(DspyrtError):
    code = "no_eligible_model"


# --------------------------------------------------------------------------------------- figures


@dataclass
class ModelStats:
    calls: int = 0
    successes: int = 0
    failures: int = 0
    rate_limited: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    cache_hits: int = 0
    latency_total_ms: float = 0.0
    recent_latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.calls if self.calls else None

    @property
    def mean_latency_ms(self) -> float | None:
        return self.latency_total_ms / self.successes if self.successes else None

    @property
    def p95_latency_ms(self) -> float | None:
        return percentile(self.recent_latency_ms, 95) if self.recent_latency_ms else None


class RateLimiter:
    """Token bucket: ``per_minute`` calls a minute, bursting to the same number."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.tokens = float(per_minute)
        self.rate = per_minute / 60.0
        self.updated = time.monotonic()

    async def acquire(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await anyio.sleep((1 - self.tokens) / self.rate)


ModelCaller = Callable[[ModelLike, CompletionRequest], Awaitable[CompletionReply]]


class ModelSwitcher:
    """Selects models, calls them within their limits, falls back when one fails, and keeps the figures."""

    def __init__(
        self,
        models: list[ModelLike],
        caller: ModelCaller,
        *,
        retries: int = 2,
        retry_backoff: float = 0.2,
        exploration: float = 0.5,
        on_call: Callable[[str, CompletionReply | None, str | None], Awaitable[None]] | None = None,
        fallback: Mapping[str, Sequence[str]] | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        if not models:
            raise NoEligibleModelError("no models configured")
        self.models = {m.model: m for m in models}
        # Each model's declared fallback chain (models without one are absent or map to []).
        self.fallback = {name: [m for m in chain if m in self.models and m != name]
                         for name, chain in (fallback or {}).items()}  # fmt: skip
        self.cache = cache
        self.caller = caller
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.exploration = exploration
        self.on_call = on_call
        self.stats = {name: ModelStats() for name in self.models}
        self._limits = {name: anyio.CapacityLimiter(max(1, m.max_concurrency)) for name, m in self.models.items()}
        self._rates = {
            name: RateLimiter(m.rate_limit_per_minute) for name, m in self.models.items() if m.rate_limit_per_minute
        }

    # --- selection -----------------------------------------------------------------------------------

    def eligible(self, req: SelectRequest) -> list[ModelLike]:
        pool = [m for m in self.models.values() if m.model not in req.exclude]
        if req.tags:
            pool = [m for m in pool if set(req.tags) <= set(m.tags)]
        if req.max_price_per_million is not None:
            pool = [m for m in pool if price_per_million(m) <= req.max_price_per_million]
        preferred = {t for t in (req.task_kind, req.role) if t}
        if preferred:
            tagged = [m for m in pool if preferred & set(m.tags)]
            pool = tagged or pool
        return pool

    def rank(self, req: SelectRequest) -> list[CandidateScore]:
        pool = self.eligible(req)
        if not pool:
            raise NoEligibleModelError(
                f"no model matches tags={req.tags} max_price_per_million={req.max_price_per_million} "
                f"(known: {', '.join(self.models)})"
            )
        return self._score(pool)

    def _score(self, pool: list[ModelLike]) -> list[CandidateScore]:
        total = sum(self.stats[m.model].calls for m in pool) or 1
        latencies = [s.mean_latency_ms for m in pool if (s := self.stats[m.model]).mean_latency_ms is not None]
        slowest = max(latencies, default=0.0) or 1.0
        priciest = max((price_per_million(m) for m in pool), default=0.0) or 1.0
        scored: list[CandidateScore] = []
        for m in pool:
            s = self.stats[m.model]
            if s.calls == 0:
                score, note = math.inf, "untried: explored first"
            else:
                reward = (s.success_rate or 0.0) * (
                    1 - 0.3 * (s.mean_latency_ms or slowest) / slowest - 0.2 * price_per_million(m) / priciest
                )
                bonus = self.exploration * math.sqrt(math.log(total + 1) / s.calls)
                score, note = reward + bonus, f"reward {reward:.3f} + exploration {bonus:.3f}"
            scored.append(
                CandidateScore(
                    model=m.model,
                    score=score if math.isfinite(score) else 1e9,
                    calls=s.calls,
                    success_rate=s.success_rate,
                    mean_latency_ms=s.mean_latency_ms,
                    price_per_million=price_per_million(m),
                    note=note,
                )
            )
        # Ties (e.g. all untried) break towards the cheaper model, then the name, so selection is deterministic.
        scored.sort(key=lambda c: (-c.score, c.price_per_million, c.model))
        return scored

    def select(self, req: SelectRequest) -> Selection:
        ranked = self.rank(req)
        best = ranked[0]
        rules = []
        if req.tags:
            rules.append(f"has tags {req.tags}")
        if req.task_kind or req.role:
            rules.append(
                f"preferred for {req.task_kind or ''}{'/' if req.task_kind and req.role else ''}{req.role or ''}"
            )
        if req.max_price_per_million is not None:
            rules.append(f"price <= {req.max_price_per_million}/M tokens")
        why = f"{best.model}: {best.note}"
        if best.success_rate is not None:
            why += f"; success {best.success_rate:.0%}, mean latency {best.mean_latency_ms or 0:.0f} ms"
        reason = f"{why}; {len(ranked)} eligible" + (f" ({', '.join(rules)})" if rules else "")
        chain = self.fallback.get(best.model, [])
        reason += f"; falls back to {', '.join(chain)}" if chain else "; no fallback declared"
        return Selection(model=best.model, reason=reason, candidates=ranked, fallback=chain)

    # --- calling -------------------------------------------------------------------------------------

    def figures(self) -> list[ModelFigures]:
        return [
            ModelFigures(
                model=name,
                calls=s.calls,
                successes=s.successes,
                failures=s.failures,
                rate_limited=s.rate_limited,
                success_rate=s.success_rate,
                mean_latency_ms=s.mean_latency_ms,
                p95_latency_ms=s.p95_latency_ms,
                input_tokens=s.input_tokens,
                output_tokens=s.output_tokens,
                cost=round(s.cost, 6),
                cache_hits=s.cache_hits,
            )
            for name, s in self.stats.items()
        ]

    def _order(self, req: CompletionRequest) -> list[str]:
        """The first model (pinned, or the best by the rules) and then its fallback chain."""
        select = SelectRequest(
            task_kind=req.task_kind, role=req.role, tags=req.tags, max_price_per_million=req.max_price_per_million
        )
        if req.model is not None:
            if req.model not in self.models:
                raise NoEligibleModelError(f"unknown model {req.model!r}; known: {', '.join(self.models)}")
            first, ranked = req.model, []
        else:
            ranked = [c.model for c in self.rank(select)]
            first = ranked[0]
        if not req.fallback:
            return [first]
        declared = self.fallback.get(first, [])
        # Without a declared chain, a request that let the switcher choose may go on to the next ranked model.
        chain = declared or ranked[1:]
        return [first, *(m for m in chain if m != first)]

    def cache_key(self, spec: ModelLike, req: CompletionRequest) -> str:
        """The response cache's key of ``req`` on ``spec``: what shapes the answer, nothing else."""
        return cache_key(
            spec.model,
            {"temperature": spec.temperature, "max_tokens": spec.max_tokens},
            {
                "messages": [[m.role, m.content] for m in req.messages],
                "temperature": req.temperature,
                "max_tokens": req.max_tokens,
                "sample": req.sample,
            },
        )

    async def complete(self, req: CompletionRequest) -> CompletionReply:
        """Answer from the cache, else call the first model; retry transient failures with backoff (a rate limit
        waits its retry-after hint), then go down the fallback chain. A permanent failure fails at once."""
        tried: list[str] = []
        errors: list[str] = []
        attempts = 0
        for name in self._order(req):
            spec = self.models[name]
            tried.append(name)
            key = self.cache_key(spec, req) if self.cache is not None else ""
            if self.cache is not None and not req.no_cache:
                hit = await self.cache.get(key)
                if hit is not None:
                    self.stats[name].cache_hits += 1
                    reply = CompletionReply(
                        model=name, text=hit.text, finish_reason=hit.finish_reason, tried=tried, cached=True,
                        attempts=attempts,
                    )  # fmt: skip
                    await self._report(name, reply, None)
                    return reply
            for attempt in range(self.retries + 1):
                attempts += 1
                try:
                    reply = await self._call_once(spec, req)
                except Exception as exc:
                    failure = classify(exc)
                    message = exc.message if isinstance(exc, DspyrtError) else f"{type(exc).__name__}: {exc}"
                    if failure.kind == "permanent":
                        # Retrying or another model cannot heal a refused key or a bad request: say so now.
                        raise ProviderError(message if message.startswith(name) else f"{name}: {message}") from None
                    errors.append(f"{name}: {message}")
                    if attempt == self.retries:
                        break
                    wait = failure.retry_after
                    if wait is None or failure.kind != "rate_limited":
                        wait = self.retry_backoff * 2**attempt
                    if wait > MAX_RETRY_AFTER:
                        break  # longer than a caller should hang on one model: the next one instead
                    await anyio.sleep(wait)
                    continue
                reply.tried = tried
                reply.attempts = attempts
                if self.cache is not None:
                    await self.cache.put(key, CachedResponse(
                        model=name, text=reply.text, finish_reason=reply.finish_reason,
                        input_tokens=reply.usage.input_tokens, output_tokens=reply.usage.output_tokens,
                    ))  # fmt: skip
                return reply
        raise AllModelsFailedError(
            f"{len(tried)} model(s) failed after {attempts} attempt(s): {'; '.join(errors[-6:])}"
        )

    async def _call_once(self, spec: ModelLike, req: CompletionRequest) -> CompletionReply:
        stats = self.stats[spec.model]
        rate = self._rates.get(spec.model)
        async with self._limits[spec.model]:
            if rate is not None:
                await rate.acquire()
            started = time.perf_counter()
            stats.calls += 1
            failure: Exception | None = None
            try:
                reply = await self.caller(spec, req)
            except Exception as exc:
                stats.failures += 1
                if classify(exc).kind == "rate_limited":
                    stats.rate_limited += 1
                failure = exc
        # Reported outside the limiter: a slow report must not hold the model's concurrency slot.
        if failure is not None:
            code = failure.code if isinstance(failure, DspyrtError) else type(failure).__name__
            await self._report(spec.model, None, code)
            raise failure
        latency = (time.perf_counter() - started) * 1000
        reply.latency_ms = round(latency, 3)
        reply.cost = spec.cost(reply.usage.input_tokens, reply.usage.output_tokens)
        stats.successes += 1
        stats.latency_total_ms += latency
        stats.recent_latency_ms.append(latency)
        stats.input_tokens += reply.usage.input_tokens
        stats.output_tokens += reply.usage.output_tokens
        stats.cost += reply.cost
        await self._report(spec.model, reply, None)
        return reply

    async def _report(self, model: str, reply: CompletionReply | None, error: str | None) -> None:
        """Telemetry only: a failed report (e.g. the bus closed) must neither fail nor repeat a paid call."""
        if self.on_call is None:
            return
        try:
            await self.on_call(model, reply, error)
        except Exception as exc:
            log.warning("reporting the %s call failed: %s: %s", model, type(exc).__name__, exc)
