"""The switcher's messages: model selection, the proxied LM call, and the figures it reports.

``dspyrt.agents.switcher.core`` (the ``ModelSwitcher``) works on them; ``dspyrt.agents.switcher.agent`` serves
them as ``<prefix>.switcher.select | complete | stats | models``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, FiniteFloat, field_validator

from dspyrt.bus import Message
from dspyrt.bus.events import EventData

# ------------------------------------------------------------------------------------------ selection


class SelectRequest(Message):
    task_kind: str | None = None
    role: str | None = None
    tags: list[str] = Field(default_factory=list)
    # Budget: the most a model may cost per million tokens (mean of input and output price).
    max_price_per_million: float | None = Field(default=None, ge=0)
    exclude: list[str] = Field(default_factory=list)
    # With a program name the reply also says which deployed version of it to run on the chosen model.
    program: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")


class CandidateScore(Message):
    model: str
    score: float
    calls: int
    success_rate: float | None
    mean_latency_ms: float | None
    price_per_million: float
    note: str


class Selection(Message):
    model: str
    reason: str
    candidates: list[CandidateScore]
    # Tried in this order after ``model`` when it fails transiently (its declared chain).
    fallback: list[str] = Field(default_factory=list)
    deployed: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------- the LM call


class ChatMessage(Message):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class TokenUsage(Message):
    input_tokens: int = 0
    output_tokens: int = 0


class CompletionRequest(Message):
    """One LM call, proxied. ``model`` pins a model; otherwise the switcher selects (with fallback)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    model: str | None = None
    task_kind: str | None = None

    @field_validator("messages")
    @classmethod
    def _has_a_turn(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        # Only system prompts is the caller's mistake, not a model failure: refuse it before any model is tried.
        if not any(m.role in ("user", "assistant") for m in messages):
            raise ValueError("at least one user or assistant message is required")
        return messages

    role: str | None = None
    tags: list[str] = Field(default_factory=list)
    max_price_per_million: float | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    # Falls back along the declared chain when the pinned/selected model fails transiently.
    fallback: bool = True
    # Skip the response cache for this call (the answer is still stored for later calls).
    no_cache: bool = False
    # The n-th identical request of one run (temperature > 0): a distinct sample, cached under its own key.
    sample: int = Field(default=0, ge=0, le=1_000_000)


class CompletionReply(Message):
    model: str
    text: str
    finish_reason: str = "stop"
    # Tokens and cost of the provider call; 0 when the answer came from the cache.
    usage: TokenUsage = Field(default_factory=TokenUsage)
    cost: float = 0.0
    latency_ms: float = 0.0
    tried: list[str] = Field(default_factory=list)
    cached: bool = False
    # Provider requests this answer took, failed attempts included (0 from the cache).
    attempts: int = 0


# ------------------------------------------------------------------------------------------ figures


class ModelFigures(Message):
    model: str
    calls: int
    successes: int
    failures: int
    rate_limited: int
    success_rate: float | None
    mean_latency_ms: float | None
    p95_latency_ms: float | None
    input_tokens: int
    output_tokens: int
    cost: float
    cache_hits: int = 0


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


# ------------------------------------------------------------------------------------------- events


class LmCall(EventData):
    """One LM call the switcher served (``lm.call``): where the answer came from, and what it took."""

    topic: ClassVar[str] = "lm.call"

    model: str = Field(max_length=200, description="the model that answered (or failed)")
    ok: bool = Field(description="true when the call was answered, after retries and fallback")
    source: Literal["provider", "cache"] = Field(
        default="provider", description="the provider, or the switcher's response cache (no latency, tokens, cost)"
    )
    latency_ms: FiniteFloat | None = Field(default=None, ge=0, description="the provider call's latency")
    input_tokens: int = Field(default=0, ge=0, description="prompt tokens the provider counted (0 from the cache)")
    output_tokens: int = Field(default=0, ge=0, description="completion tokens the provider counted")
    cost: FiniteFloat | None = Field(default=None, ge=0, description="USD the call cost (0 from the cache)")
    error: str | None = Field(default=None, description="why the call failed (ok false)")
