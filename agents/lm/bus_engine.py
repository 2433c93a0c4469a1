"""The LM proxy's client side: a DSPy 3.4 engine that sends every LM call over NATS to the model switcher.

An agent's DSPy program runs with ``dspy.context(lm=bus_lm(...))``; each call becomes one ``complete``
request to ``<prefix>.switcher.complete``, which picks the model, enforces its limits, retries, falls back and
records the figures. Only text chat is proxied (system/user/assistant messages, temperature, max_tokens).

DSPy's optimizers are synchronous and run in worker threads; the sync engine hops back to the event loop
that owns the NATS connection with ``anyio.from_thread.run`` and the loop's token, carrying the caller's trace
context with it. A ``UsageMeter`` counts calls, tokens and cost per run and enforces a budget.
"""

from __future__ import annotations

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

from agents.switcher_core import ChatMessage, CompletionReply, CompletionRequest
from bus import DspyrtError
from runtime.client import Client

SWITCHER = "switcher"
COMPLETE = "complete"
PROXY_MODEL_PREFIX = "dspyrt/"


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
    models: dict[str, int] = field(default_factory=dict)
    exhausted: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reserve(self) -> None:
        """Claim one call, or raise when the budget is spent (checked before the call is made)."""
        with self._lock:
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
            self.models[reply.model] = self.models.get(reply.model, 0) + 1


@dataclass(frozen=True)
class Routing:
    """What the switcher is told about each call: a pinned model, or what to select by."""

    model: str | None = None
    task_kind: str | None = None
    role: str | None = None
    tags: tuple[str, ...] = ()
    max_price_per_million: float | None = None
    timeout: float = 120.0


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
        if self.meter is not None:
            self.meter.reserve()
        reply = await self.client.request(
            SWITCHER,
            COMPLETE,
            to_completion_request(request, self.routing),
            CompletionReply,
            timeout=self.routing.timeout,
        )
        if self.meter is not None:
            self.meter.charge(reply)
        return reply

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


def bus_lm(client: Client, routing: Routing | None = None, meter: UsageMeter | None = None) -> Any:
    """A ``dspy.LM`` whose every call goes through the switcher. Call it on the event loop thread."""
    routing = routing or Routing()
    inner = AsyncBusEngine(client, routing, meter)
    sync = BusEngine(inner, anyio.lowlevel.current_token())
    name = PROXY_MODEL_PREFIX + (routing.model or "auto").replace("/", "-")
    return dspy.LM(name, engine=sync, async_engine=inner, cache=False)
