"""Counting what an in-process run spends on the caller's own ``dspy.LM``: calls, tokens and cost, with the same
``UsageMeter`` (and budget) the bus path charges through the switcher.

The meter travels with the LM object, as the bus engine's does: a run uses a copy of the configured LM whose
engine is wrapped, so every call is counted whichever thread makes it (DSPy's settings do not follow a plain
thread pool). That needs an engine object (DSPy 3.4's ``engine=``: the demo model, any custom engine). An LM on
one of DSPy's own backends (``engine="auto"``, a provider model string) cannot be wrapped without refusing its
client settings: its calls are counted by an LM callback, without tokens or cost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import dspy
from dspy.lm15 import Request, Response
from dspy.utils.callback import BaseCallback

from dspyrt.agents.lm.bus_engine import UsageMeter
from dspyrt.agents.lm.registry import ModelRegistry, ModelSpec
from dspyrt.agents.switcher.models import CompletionReply, TokenUsage
from dspyrt.bus import DspyrtError


def configured_lm() -> Any:
    """The LM DSPy is configured with here (``dspy.configure`` / ``dspy.context``); a clear error when none."""
    lm = dspy.settings.lm
    if lm is None:
        raise DspyrtError(
            "no language model is configured: call dspy.configure(lm=...) or run inside dspy.context(lm=...)",
            code="configuration_error",
        )
    return lm


def metered_lm(lm: Any, meter: UsageMeter, prices: ModelSpec | None = None) -> Any:
    """A copy of ``lm`` whose every call charges ``meter`` (and is refused once its budget is spent).

    ``prices``: what a token costs; default: the model's entry in the default model registry, else nothing."""
    if prices is None:
        default = ModelRegistry.default()
        prices = default.get(lm.model) if lm.model in default else None
    engine = getattr(lm, "engine", None)
    async_engine = getattr(lm, "_async_engine_spec", None)
    if engine is None or isinstance(engine, str):
        return lm.copy(callbacks=[*(lm.callbacks or []), _CallCounter(meter)])
    return lm.copy(
        engine=MeteredEngine(engine, meter, prices),
        async_engine=AsyncMeteredEngine(async_engine, meter, prices) if async_engine is not None else None,
    )


def _charge(meter: UsageMeter, response: Response, prices: ModelSpec | None) -> None:
    usage = response.usage
    input_tokens = int(getattr(usage, "input_tokens", 0) or 0)
    output_tokens = int(getattr(usage, "output_tokens", 0) or 0)
    meter.charge(
        CompletionReply(
            model=str(response.model or ""),
            text="",
            usage=TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens),
            cost=prices.cost(input_tokens, output_tokens) if prices is not None else 0.0,
            attempts=1,
        )
    )


def _failed(meter: UsageMeter, exc: Exception) -> None:
    meter.fail(exc if isinstance(exc, DspyrtError) else DspyrtError(str(exc), code="provider_unavailable"))


class MeteredEngine:
    """A sync engine that counts each call of the engine it wraps."""

    def __init__(self, inner: Any, meter: UsageMeter, prices: ModelSpec | None) -> None:
        self.inner = inner
        self.meter = meter
        self.prices = prices

    def complete(self, request: Request) -> Response:
        self.meter.reserve()
        try:
            response: Response = self.inner.complete(request)
        except Exception as exc:
            _failed(self.meter, exc)
            raise
        _charge(self.meter, response, self.prices)
        return response

    def stream(self, request: Request) -> Iterator[Any]:
        raise NotImplementedError("a metered run does not stream")

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


class AsyncMeteredEngine:
    """The async twin of :class:`MeteredEngine`."""

    def __init__(self, inner: Any, meter: UsageMeter, prices: ModelSpec | None) -> None:
        self.inner = inner
        self.meter = meter
        self.prices = prices

    async def complete(self, request: Request) -> Response:
        self.meter.reserve()
        try:
            response: Response = await self.inner.complete(request)
        except Exception as exc:
            _failed(self.meter, exc)
            raise
        _charge(self.meter, response, self.prices)
        return response

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        raise NotImplementedError("a metered run does not stream")
        yield  # pragma: no cover

    async def aclose(self) -> None:
        aclose = getattr(self.inner, "aclose", None)
        if callable(aclose):
            await aclose()


class _CallCounter(BaseCallback):  # type: ignore[misc]
    """Counts the calls of an LM whose engine cannot be wrapped (no tokens, no cost: DSPy does not pass them)."""

    def __init__(self, meter: UsageMeter) -> None:
        self.meter = meter

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.meter.reserve()

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: Exception | None = None) -> None:
        if exception is not None:
            _failed(self.meter, exception)
