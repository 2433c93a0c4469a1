"""The model switcher agent: ``<prefix>.switcher.select | complete | stats | models`` on the bus.

Every LM call of every agent's DSPy program arrives here (see ``dspyrt.agents.lm.bus_engine``); the core
``ModelSwitcher`` selects, limits, retries and falls back. Each call is published as an ``lm.call`` event and
recorded as OpenTelemetry metrics (latency histogram, token and cost counters, labelled by model). Replicas
share the load through the queue group; each reports the figures of the calls it served.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskGroup
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

from dspyrt.agents.deployments import DeployRegistry
from dspyrt.agents.lm.cache import ResponseCache, ResponseStore
from dspyrt.agents.lm.registry import ModelRegistry
from dspyrt.agents.switcher.caller import DspyModelCaller
from dspyrt.agents.switcher.core import ModelSwitcher
from dspyrt.agents.switcher.models import (
    CacheFigures,
    CompletionReply,
    CompletionRequest,
    LmCall,
    ModelInfo,
    ModelList,
    Selection,
    SelectRequest,
    SwitcherStats,
)
from dspyrt.agents.switcher.response_store import DeferredStore, KvResponseStore
from dspyrt.bus import Empty
from dspyrt.bus.streams import cache_bucket
from dspyrt.runtime.agent import Agent, CheckResult, endpoint
from dspyrt.runtime.config import IntegrationMode

log = logging.getLogger("dspyrt.switcher")

# Deferred writes held at once; beyond it they are awaited inline (back pressure instead of unbounded memory).
MAX_DEFERRED = 1024


class Background:
    """Work an LM call's reply need not wait for (the ``lm.call`` event, the shared cache write): run after the
    reply, in the lifespan's task group, under the caller's trace context. Each piece is shielded from the
    switcher being stopped (bounded by its own publish timeout), so the lifespan ends only once every pending
    write is done, before the host closes the bus."""

    def __init__(self, tg: TaskGroup, limit: int = MAX_DEFERRED) -> None:
        self.tg = tg
        self.limit = limit
        self.pending = 0

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        if self.pending >= self.limit:
            await work()
            return
        self.pending += 1
        self.tg.start_soon(self._one, work, otel_context.get_current())

    async def _one(self, work: Callable[[], Awaitable[None]], ctx: otel_context.Context) -> None:
        token = otel_context.attach(ctx)
        try:
            with anyio.CancelScope(shield=True):
                await work()
        except Exception as exc:  # telemetry and cache writes only: never fatal for the agent
            log.warning("deferred switcher write failed: %s: %s", type(exc).__name__, exc)
        finally:
            otel_context.detach(token)
            self.pending -= 1


class SwitcherAgent(Agent):
    """The guide's ModelSwitcher on the bus."""

    name = "switcher"
    group = "models"
    modes = frozenset({IntegrationMode.FULL, IntegrationMode.OPTIMIZATION_ONLY})
    description = "model registry, selection, LM proxy with limits, retries and fallback"
    publishes = (LmCall,)

    registry: ModelRegistry
    switcher: ModelSwitcher
    deployments: DeployRegistry
    cache: ResponseCache | None

    def make_registry(self) -> ModelRegistry:
        if self.config.models_file is not None:
            return ModelRegistry.from_toml(self.config.models_file)
        return ModelRegistry.default()

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg, self._serving(Background(tg)):
            yield

    @asynccontextmanager
    async def _serving(self, background: Background) -> AsyncIterator[None]:
        self.registry = self.make_registry()
        self.deployments = await DeployRegistry.open(self.bus, self.config.stream_layout)
        meter = metrics.get_meter("dspyrt.switcher")
        latency = meter.create_histogram("dspyrt.lm.latency", unit="ms", description="LM call latency")
        tokens = meter.create_counter("dspyrt.lm.tokens", unit="{token}", description="LM tokens")
        cost = meter.create_counter("dspyrt.lm.cost", unit="USD", description="LM cost")
        failures = meter.create_counter("dspyrt.lm.failures", unit="{call}", description="failed LM calls")
        cache_hits = meter.create_counter(
            "dspyrt.lm.cache_hits", unit="{call}", description="LM calls answered from the cache"
        )

        async def on_call(model: str, reply: CompletionReply | None, error: str | None) -> None:
            labels = {"model": model}
            event: LmCall
            if reply is not None and reply.cached:
                # Every call says where its answer came from. A cache hit has no provider latency, tokens or
                # cost: none is recorded, so the model's figures stay the provider's.
                cache_hits.add(1, labels)
                event = LmCall(model=model, ok=True, source="cache", cost=0.0)
            elif reply is not None:
                latency.record(reply.latency_ms, labels)
                tokens.add(reply.usage.input_tokens, {**labels, "direction": "input"})
                tokens.add(reply.usage.output_tokens, {**labels, "direction": "output"})
                cost.add(reply.cost, labels)
                event = LmCall(
                    model=model,
                    ok=True,
                    latency_ms=reply.latency_ms,
                    input_tokens=reply.usage.input_tokens,
                    output_tokens=reply.usage.output_tokens,
                    cost=reply.cost,
                )
            else:
                failures.add(1, {**labels, "error.type": error or "error"})
                event = LmCall(model=model, ok=False, error=error)
            # After the reply: the event is telemetry, and its publish cost the call its latency at 8 in flight.
            await background.run(lambda: self.publish_event(LmCall.topic, event))

        self.cache = await self.make_cache(background)
        self.switcher = ModelSwitcher(
            list(self.registry),
            DspyModelCaller(self.registry),
            on_call=on_call,
            fallback={spec.model: self.registry.fallback_chain(spec.model) for spec in self.registry},
            cache=self.cache,
        )
        yield

    async def make_cache(self, background: Background | None = None) -> ResponseCache | None:
        """The response cache: an LRU in front of a KV bucket every switcher replica shares (None: turned off).
        With ``background``, writes to the bucket run after the reply; without, they are awaited."""
        cfg = self.config
        if not cfg.lm_cache:
            return None
        kv = await cache_bucket(
            self.bus,
            self.bus.subjects.lm_cache_bucket,
            cfg.stream_layout,
            ttl=cfg.lm_cache_ttl_hours * 3600,
            max_bytes=cfg.lm_cache_max_mb * 1024 * 1024,
        )
        # The shared write waits for JetStream's ack: deferred, so the reply does not wait for it (this replica
        # answers a repeat from its LRU at once; other replicas see the entry a moment later).
        shared = KvResponseStore(kv)
        store: ResponseStore = shared if background is None else DeferredStore(shared, background.run)
        return ResponseCache(store, memory_entries=cfg.lm_cache_memory_entries)

    @endpoint("select")
    async def select(self, request: SelectRequest) -> Selection:
        """Pick a model for a task kind / role / tags / budget, and say why; with ``program``, the deployed
        optimized version of it to use on that model."""
        selection = self.switcher.select(request)
        if request.program:
            deployed = await self.deployments.active(request.program, selection.model)
            if deployed is not None:
                selection.deployed = deployed.model_dump(mode="json")
                selection.reason += f"; deployed version {deployed.version} of {request.program}"
        return selection

    @endpoint("complete")
    async def complete(self, request: CompletionRequest) -> CompletionReply:
        """One LM call, proxied with limits, retries and fallback."""
        reply = await self.switcher.complete(request)
        # On this request's process span, so a trace shows which model served each LM call and what it cost
        # (OpenTelemetry's gen_ai attribute names; the prompt and completion stay out of our spans).
        trace.get_current_span().set_attributes(
            {
                "gen_ai.request.model": request.model or "auto",
                "gen_ai.response.model": reply.model,
                "gen_ai.usage.input_tokens": reply.usage.input_tokens,
                "gen_ai.usage.output_tokens": reply.usage.output_tokens,
                "dspyrt.lm.tried": reply.tried,
                "dspyrt.lm.cost": reply.cost,
                "dspyrt.lm.source": "cache" if reply.cached else "provider",
                "dspyrt.lm.attempts": reply.attempts,
            }
        )
        return reply

    @endpoint("stats")
    async def stats(self, _: Empty) -> SwitcherStats:
        """Per-model figures of the calls this instance served."""
        figures = self.switcher.figures()
        cache = self.cache
        return SwitcherStats(
            instance_calls=sum(f.calls for f in figures),
            models=figures,
            cache=CacheFigures(enabled=cache is not None, hits=cache.hits if cache else 0,
                               misses=cache.misses if cache else 0, writes=cache.writes if cache else 0),
        )  # fmt: skip

    @endpoint("models")
    async def models(self, _: Empty) -> ModelList:
        """The configured models (never their credentials)."""
        return ModelList(
            models=[
                ModelInfo(
                    model=s.model,
                    tags=list(s.tags),
                    input_cost_per_million=s.input_cost_per_million,
                    output_cost_per_million=s.output_cost_per_million,
                    context_window=s.context_window,
                    max_concurrency=s.max_concurrency,
                    rate_limit_per_minute=s.rate_limit_per_minute,
                    fallback=self.registry.fallback_chain(s.model),
                    demo=s.is_demo,
                )
                for s in self.registry
            ]
        )

    async def health_checks(self) -> dict[str, CheckResult]:
        return {"models": CheckResult(ok=len(self.registry) > 0, detail=f"{len(self.registry)} configured")}
