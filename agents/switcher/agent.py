"""The model switcher agent: ``<prefix>.switcher.select | complete | stats | models`` on the bus.

Every LM call of every agent's DSPy program arrives here (see ``dspyrt.agents.lm.bus_engine``); the core
``ModelSwitcher`` selects, limits, retries and falls back. Each call is published as an ``lm.call`` event and
recorded as OpenTelemetry metrics (latency histogram, token and cost counters, labelled by model). Replicas
share the load through the queue group; each reports the figures of the calls it served.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from dspy import lm15
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import metrics, trace
from pydantic import Field

from dspyrt.agents.deployments import DeployRegistry
from dspyrt.agents.lm.cache import ResponseCache
from dspyrt.agents.lm.demo import demo_engines
from dspyrt.agents.lm.errors import (
    ProviderError,
    RateLimitedError,
    RedactFn,
    TransientProviderError,
    classify,
    provider_message,
)
from dspyrt.agents.lm.registry import ModelRegistry, ModelSpec, build_lm
from dspyrt.agents.switcher.core import (
    CompletionReply,
    CompletionRequest,
    ModelFigures,
    ModelLike,
    ModelSwitcher,
    Selection,
    SelectRequest,
    TokenUsage,
)
from dspyrt.bus import Empty, Message
from dspyrt.bus.streams import cache_bucket
from dspyrt.runtime.agent import Agent, CheckResult, endpoint


class CacheFigures(Message):
    enabled: bool
    hits: int = 0
    misses: int = 0
    writes: int = 0


class SwitcherStats(Message):
    instance_calls: int
    models: list[ModelFigures]
    cache: CacheFigures | None = None


class ModelInfo(Message):
    model: str
    tags: list[str]
    input_cost_per_million: float
    output_cost_per_million: float
    context_window: int
    max_concurrency: int
    rate_limit_per_minute: int | None
    fallback: list[str] = Field(default_factory=list)
    demo: bool


class ModelList(Message):
    models: list[ModelInfo] = Field(default_factory=list)


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


class DspyModelCaller:
    """Calls a model through its real ``dspy.LM`` (built once per model; keys only from the environment).

    Demo models skip the second ``dspy.LM`` layer and call their engine with the request as it came: the
    caller's DSPy already formatted it, and that layer cost more than the demo engine itself (measured
    0.3-0.6 ms of the ~2 ms hop).
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._lms: dict[str, Any] = {}
        self._engines: dict[str, Any] = {}
        names = {spec.api_key_env for spec in registry if spec.api_key_env}
        self._redact = RedactFn([os.environ.get(n, "") for n in names])

    async def _demo(self, spec: ModelSpec, req: CompletionRequest) -> CompletionReply:
        if spec.model not in self._engines:
            self._engines[spec.model] = demo_engines(faults=spec.faults)[1]
        system = "\n".join(m.content for m in req.messages if m.role in ("system", "developer")) or None
        turns = tuple(
            lm15.Message.assistant(m.content) if m.role == "assistant" else lm15.Message.user(m.content)
            for m in req.messages
            if m.role in ("user", "assistant")
        )
        config = lm15.Config(temperature=req.temperature, max_tokens=req.max_tokens)
        try:
            response = await self._engines[spec.model].complete(
                lm15.Request(model=spec.model, messages=turns, system=system, config=config)
            )
        except lm15.RateLimitError as exc:
            raise RateLimitedError(f"{spec.model} is rate limited: {exc}", delay=classify(exc).retry_after) from exc
        return CompletionReply(
            model=spec.model,
            text=response.message.text or "",
            finish_reason=str(response.finish_reason or "stop"),
            usage=TokenUsage(
                input_tokens=int(response.usage.input_tokens or 0), output_tokens=int(response.usage.output_tokens or 0)
            ),
        )

    def lm(self, spec: ModelSpec) -> Any:
        if spec.model not in self._lms:
            # The switcher owns retries and fallback: DSPy's own retry loop would hide failures from it.
            self._lms[spec.model] = build_lm(spec, num_retries=0)
        return self._lms[spec.model]

    async def __call__(self, model: ModelLike, req: CompletionRequest) -> CompletionReply:
        spec = self.registry.get(model.model)
        if spec.is_demo:
            return await self._demo(spec, req)
        options: dict[str, Any] = {}
        if req.temperature is not None:
            options["temperature"] = req.temperature
        if req.max_tokens is not None:
            options["max_tokens"] = req.max_tokens
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            response = await self.lm(spec).aforward(messages=messages, **options)
        except Exception as exc:
            # Providers may quote the key in their errors ("Incorrect API key provided: sk-..."): the text is
            # redacted and the original (which holds it too) is not chained, so no reply, log or span sees it.
            failure = classify(exc)
            text = provider_message(exc, model=spec.model, key_variable=spec.api_key_env, redact=self._redact)
            if failure.kind == "rate_limited":
                raise RateLimitedError(text, delay=failure.retry_after) from None
            if failure.kind == "transient":
                raise TransientProviderError(text) from None
            raise ProviderError(text) from None
        choice = response.choices[0]
        usage = getattr(response, "usage", None)
        return CompletionReply(
            model=spec.model,
            text=str(choice.message.content or ""),
            finish_reason=str(getattr(choice, "finish_reason", None) or "stop"),
            usage=TokenUsage(
                input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            ),
        )


class SwitcherAgent(Agent):
    """The guide's ModelSwitcher on the bus."""

    name = "switcher"
    group = "models"
    description = "model registry, selection, LM proxy with limits, retries and fallback"

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
            data: dict[str, Any]
            if reply is not None and reply.cached:
                # Every call says where its answer came from. A cache hit has no provider latency, tokens or
                # cost: none is recorded, so the model's figures stay the provider's.
                cache_hits.add(1, labels)
                data = {"model": model, "ok": True, "source": "cache", "input_tokens": 0, "output_tokens": 0,
                        "cost": 0.0}  # fmt: skip
            elif reply is not None:
                latency.record(reply.latency_ms, labels)
                tokens.add(reply.usage.input_tokens, {**labels, "direction": "input"})
                tokens.add(reply.usage.output_tokens, {**labels, "direction": "output"})
                cost.add(reply.cost, labels)
                data = {
                    "model": model,
                    "ok": True,
                    "source": "provider",
                    "latency_ms": reply.latency_ms,
                    "input_tokens": reply.usage.input_tokens,
                    "output_tokens": reply.usage.output_tokens,
                    "cost": reply.cost,
                }
            else:
                failures.add(1, {**labels, "error.type": error or "error"})
                data = {"model": model, "ok": False, "error": error, "source": "provider"}
            await self.publish_event("lm.call", data)

        self.cache = await self.make_cache()
        self.switcher = ModelSwitcher(
            list(self.registry),
            DspyModelCaller(self.registry),
            on_call=on_call,
            fallback={spec.model: self.registry.fallback_chain(spec.model) for spec in self.registry},
            cache=self.cache,
        )
        yield

    async def make_cache(self) -> ResponseCache | None:
        """The response cache: an LRU in front of a KV bucket every switcher replica shares (None: turned off)."""
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
        return ResponseCache(KvResponseStore(kv), memory_entries=cfg.lm_cache_memory_entries)

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
