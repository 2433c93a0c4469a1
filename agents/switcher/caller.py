"""How the switcher calls a model: through its real ``dspy.LM``, or a demo model's engine directly.

A provider's failure is translated here into the switcher's failure taxonomy (``dspyrt.agents.lm.errors``:
rate limited, transient, permanent), with any API key redacted from the text.
"""

from __future__ import annotations

import os
from typing import Any

from dspy import lm15

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
from dspyrt.agents.switcher.core import ModelLike
from dspyrt.agents.switcher.models import CompletionReply, CompletionRequest, TokenUsage


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
