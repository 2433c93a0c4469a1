"""The LM proxy's client side: a DSPy 3.4 engine that sends every LM call over NATS to the model switcher.

An agent's DSPy program runs with ``dspy.context(lm=bus_lm(...))``; each call becomes one ``complete``
request to ``<prefix>.switcher.complete``, which picks the model, enforces its limits, retries, falls back and
records the figures. Only text chat is proxied (system/user/assistant messages, temperature, max_tokens).

DSPy's optimizers are synchronous and run in worker threads; the sync engine hops back to the event loop
that owns the NATS connection with ``anyio.from_thread.run`` and the loop's token, carrying the caller's trace
context with it. A ``UsageMeter`` counts calls, tokens and cost per run and enforces a budget.

A call that failed transiently after the switcher's retries and fallback is sent once more; if it fails again
the meter counts it as a failed call and the error reaches DSPy (an evaluation then records the example as an
error, not a wrong answer). A permanent failure (``provider_error``: a refused key, an unknown model) is kept
by the meter and every later call of the run fails with it at once, so the run stops with the provider's own
reason however DSPy's thread pools report it (they end with "Execution cancelled ...").
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import dspy
from dspy.lm15 import Message, Request, Response, Usage
from opentelemetry import context as otel_context
from opentelemetry import trace

from dspyrt.agents.lm.cache import disable_dspy_cache
from dspyrt.agents.lm.errors import TRANSIENT_CALL_CODES
from dspyrt.agents.switcher.models import ChatMessage, CompletionReply, CompletionRequest
from dspyrt.bus import DspyrtError, RemoteError
from dspyrt.bus.errors import is_permanent
from dspyrt.runtime.client import Client

SWITCHER = "switcher"
COMPLETE = "complete"
PROXY_MODEL_PREFIX = "dspyrt/"
# Pause before a call that failed after the switcher's retries is sent once more.
RETRY_PAUSE = 1.0


class BudgetExhaustedError(DspyrtError):
    """The run has spent its LM-call or cost budget; no further calls are made."""

    code = "budget_exhausted"


@dataclass
class UsageMeter:
    """LM usage of one run, shared by every thread the run uses; enforces ``max_calls`` / ``max_cost``."""

    max_calls: int | None = None
    max_cost: float | None = None
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    # Answers that came from the switcher's cache (no tokens, no cost), and calls that failed for good.
    cached_calls: int = 0
    failed_calls: int = 0
    # Provider requests made for this run, failed attempts (429, 5xx) included.
    provider_requests: int = 0
    models: dict[str, int] = field(default_factory=dict)
    exhausted: str | None = None
    # The first permanent failure (the provider refused): every later call of the run fails with it.
    fatal: DspyrtError | None = None
    _samples: dict[str, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def answered_calls(self) -> int:
        return self.calls - self.failed_calls

    @property
    def error_rate(self) -> float:
        return self.failed_calls / self.calls if self.calls else 0.0

    def reserve(self) -> None:
        """Claim one call, or raise when the budget is spent or the provider refused (checked before the call)."""
        with self._lock:
            if self.fatal is not None:
                raise RemoteError(self.fatal.to_body())
            if self.exhausted is None:
                if self.max_calls is not None and self.calls >= self.max_calls:
                    self.exhausted = f"LM-call budget of {self.max_calls} calls spent"
                elif self.max_cost is not None and self.cost >= self.max_cost:
                    self.exhausted = f"cost budget of ${self.max_cost:g} spent (${self.cost:.6f})"
            if self.exhausted is not None:
                raise BudgetExhaustedError(self.exhausted)
            self.calls += 1

    def charge(self, reply: CompletionReply) -> None:
        with self._lock:
            self.input_tokens += reply.usage.input_tokens
            self.output_tokens += reply.usage.output_tokens
            self.cost += reply.cost
            self.cached_calls += reply.cached
            self.provider_requests += reply.attempts
            self.models[reply.model] = self.models.get(reply.model, 0) + 1

    def fail(self, error: DspyrtError) -> None:
        """Count a call that failed for good; keep a permanent failure so the run stops with its reason."""
        with self._lock:
            self.failed_calls += 1
            if self.fatal is None and is_permanent(error):
                self.fatal = error

    def sample(self, request: CompletionRequest) -> int:
        """How many identical requests this run made before (a distinct sample each when temperature > 0)."""
        if not request.temperature:
            return 0
        key = hashlib.sha256(request.model_dump_json(exclude={"sample"}).encode()).hexdigest()
        with self._lock:
            n = self._samples.get(key, 0)
            self._samples[key] = n + 1
            return n


@dataclass(frozen=True)
class Routing:
    """What the switcher is told about each call: a pinned model, or what to select by."""

    model: str | None = None
    task_kind: str | None = None
    role: str | None = None
    tags: tuple[str, ...] = ()
    max_price_per_million: float | None = None
    timeout: float = 120.0
    # False: only the first model answers (no fallback chain). True: its declared chain may.
    fallback: bool = True
    # Skip the switcher's response cache for this run's calls.
    no_cache: bool = False


def _system_text(request: Request) -> str | None:
    system = request.system
    if system is None:
        return None
    if isinstance(system, str):
        return system
    return "\n".join(getattr(part, "text", "") or "" for part in system)


_ROLES: dict[str, Literal["system", "developer", "user", "assistant"]] = {
    "system": "system",
    "developer": "developer",
    "user": "user",
    "assistant": "assistant",
}


def to_completion_request(request: Request, routing: Routing) -> CompletionRequest:
    messages: list[ChatMessage] = []
    system = _system_text(request)
    if system:
        messages.append(ChatMessage(role="system", content=system))
    for message in request.messages:
        role = _ROLES.get(str(message.role), "user")
        messages.append(ChatMessage(role=role, content=message.text or ""))
    config = request.config
    return CompletionRequest(
        messages=messages,
        model=routing.model,
        task_kind=routing.task_kind,
        role=routing.role,
        tags=list(routing.tags),
        max_price_per_million=routing.max_price_per_million,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
        fallback=routing.fallback,
        no_cache=routing.no_cache,
    )


def to_response(reply: CompletionReply) -> Response:
    return Response(
        id=None,
        model=reply.model,
        message=Message.assistant(reply.text),
        finish_reason=reply.finish_reason if reply.finish_reason in ("stop", "length") else "stop",  # type: ignore[arg-type]
        usage=Usage(input_tokens=reply.usage.input_tokens, output_tokens=reply.usage.output_tokens),
    )


class AsyncBusEngine:
    """Async engine: awaits the switcher on the current event loop."""

    def __init__(self, client: Client, routing: Routing, meter: UsageMeter | None = None) -> None:
        self.client = client
        self.routing = routing
        self.meter = meter

    async def call(self, request: Request) -> CompletionReply:
        meter = self.meter
        if meter is not None:
            meter.reserve()
        completion = to_completion_request(request, self.routing)
        if meter is not None:
            completion.sample = meter.sample(completion)
        try:
            try:
                reply = await self._send(completion)
            except DspyrtError as exc:
                if exc.code not in TRANSIENT_CALL_CODES:
                    raise
                # Failed after the switcher's retries and the fallback chain: once more, after a pause.
                await anyio.sleep(RETRY_PAUSE)
                reply = await self._send(completion)
        except DspyrtError as exc:
            if meter is not None:
                meter.fail(exc)
            raise
        if meter is not None:
            meter.charge(reply)
        return reply

    async def _send(self, completion: CompletionRequest) -> CompletionReply:
        return await self.client.request(
            SWITCHER, COMPLETE, completion, CompletionReply, timeout=self.routing.timeout
        )

    async def complete(self, request: Request) -> Response:
        return to_response(await self.call(request))

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        raise NotImplementedError("the bus engine does not stream")
        yield  # pragma: no cover

    async def aclose(self) -> None:
        return None


class BusEngine:
    """Sync engine for DSPy code running in worker threads of the agent's event loop."""

    def __init__(self, inner: AsyncBusEngine, token: anyio.lowlevel.EventLoopToken) -> None:
        self.inner = inner
        self.token = token
        # DSPy's thread pools do not carry contextvars: calls from those threads join the creator's trace.
        self.trace_context = otel_context.get_current()

    def complete(self, request: Request) -> Response:
        trace_context = otel_context.get_current()
        if not trace.get_current_span(trace_context).get_span_context().is_valid:
            trace_context = self.trace_context

        async def call() -> CompletionReply:
            attached = otel_context.attach(trace_context)
            try:
                return await self.inner.call(request)
            finally:
                otel_context.detach(attached)

        return to_response(anyio.from_thread.run(call, token=self.token))

    def stream(self, request: Request) -> Iterator[Any]:
        raise NotImplementedError("the bus engine does not stream")

    def close(self) -> None:
        return None


def program_context(lm: Any, **overrides: Any) -> Any:
    """``dspy.context`` for running a program in an agent: its LM, and DSPy's call history off. DSPy keeps every
    call (prompts and answers) in a process-wide list of up to 10,000 and in each calling module's own list of as
    many (``settings.max_history_size``): in a long-lived agent that is hundreds of MB of old prompts for large
    inputs, kept for ``inspect_history``, which an agent never calls (its traces have the calls)."""
    return dspy.context(lm=lm, disable_history=True, **overrides)


def bus_lm(client: Client, routing: Routing | None = None, meter: UsageMeter | None = None) -> Any:
    """A ``dspy.LM`` whose every call goes through the switcher. Call it on the event loop thread."""
    disable_dspy_cache()
    routing = routing or Routing()
    inner = AsyncBusEngine(client, routing, meter)
    sync = BusEngine(inner, anyio.lowlevel.current_token())
    name = PROXY_MODEL_PREFIX + (routing.model or "auto").replace("/", "-")
    return dspy.LM(name, engine=sync, async_engine=inner, cache=False)
