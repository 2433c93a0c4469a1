"""One error taxonomy for LM providers, decided here and nowhere else.

Every failure of a provider call is one of three kinds:

* ``rate_limited`` — HTTP 429 / DSPy's ``LMRateLimitError``: wait (the provider's Retry-After when it gave one),
  then try again, then the fallback chain.
* ``transient`` — refused or reset connections, timeouts, HTTP 408/409/5xx, overloaded: retried with backoff,
  then the fallback chain.
* ``permanent`` — HTTP 400/401/403/404/413/422, bad key, unknown model, context window exceeded, content policy,
  billing: retrying cannot help, so the call (and the task that made it) fails at once with ``provider_error``.

DSPy 3.4 already projects every engine's failure (its native lm15 engine and LiteLLM alike) onto its own error
classes with the HTTP ``status`` and ``retry_after`` (``dspy.utils.exceptions``); we read those, then the status,
then plain Python connection and timeout errors anywhere in the ``__cause__`` chain. Anything else is permanent:
an error we cannot name is not retried into a bill.

The errors that cross the bus (each with a stable ``code``) are defined here too, so the switcher that raises them
and the evaluators and optimizers that receive them agree on what each code means.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from dspy import lm15
from dspy.utils.exceptions import (
    LMAuthError,
    LMBillingError,
    LMInvalidRequestError,
    LMLockTimeoutError,
    LMProviderError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
)

from dspyrt.bus import DspyrtError, PermanentError, RetryableError

FailureKind = Literal["rate_limited", "transient", "permanent"]

# Codes of a failed LM call as the caller of the switcher sees them.
PROVIDER_ERROR = "provider_error"  # permanent: the provider refused the request
PROVIDER_UNRELIABLE = "provider_unreliable"  # a run saw more failed calls than its limit allows
ALL_MODELS_FAILED = "all_models_failed"  # transient failures on the model and its whole fallback chain
# A call that failed for one of these reasons may succeed later: an example it belonged to is an error, not a 0.
TRANSIENT_CALL_CODES = frozenset({ALL_MODELS_FAILED, "rate_limited", "provider_unavailable"})

_TRANSIENT_STATUS = frozenset({408, 409, 425, 500, 502, 503, 504, 529})
_TRANSIENT_CLASSES = (LMServerError, LMTimeoutError, LMTransportError, LMLockTimeoutError)
_PERMANENT_CLASSES = (LMAuthError, LMBillingError, LMInvalidRequestError)
# A provider's own hint names its default variable ("set OPENAI_API_KEY"); ours names the models file's.
_KEY_VARIABLE = re.compile(r"\b[A-Z][A-Z0-9_]*_API_KEY\b")


@dataclass(frozen=True)
class ProviderFailure:
    """What one failed provider call was: its kind, HTTP status and retry hint when known."""

    kind: FailureKind
    status: int | None = None
    retry_after: float | None = None
    reason: str = "error"  # short name: auth, rate_limit, server, timeout, transport, invalid_request, ...


def classify(exc: BaseException) -> ProviderFailure:
    """The kind of a provider failure, from DSPy's error class, the HTTP status, or the cause chain."""
    status = _status(exc)
    retry_after = _retry_after(exc)
    for current in _chain(exc):
        if isinstance(current, LMRateLimitError | lm15.RateLimitError | RateLimitedError):
            return ProviderFailure("rate_limited", status or 429, retry_after, "rate_limit")
        if isinstance(current, _PERMANENT_CLASSES):
            return ProviderFailure("permanent", status, retry_after, str(current.code or "provider"))
        if isinstance(current, _TRANSIENT_CLASSES):
            return ProviderFailure("transient", status, retry_after, str(current.code or "server"))
        if isinstance(current, lm15.ServerError | lm15.TimeoutError | lm15.TransportError):
            return ProviderFailure("transient", status, retry_after, "server")
    if status is not None:
        if status == 429:
            return ProviderFailure("rate_limited", status, retry_after, "rate_limit")
        if status in _TRANSIENT_STATUS or status >= 500:
            return ProviderFailure("transient", status, retry_after, "server")
        return ProviderFailure("permanent", status, retry_after, "http_" + str(status))
    for current in _chain(exc):
        if isinstance(current, TimeoutError | ConnectionError | RetryableError):
            return ProviderFailure("transient", None, retry_after, "transport")
        if isinstance(current, LMProviderError):
            break
        # httpx/openai/aiohttp name their network errors like this; they are not importable here without a cost.
        name = type(current).__name__
        if name.endswith(("ConnectError", "ConnectionError", "RemoteProtocolError", "ReadError", "Timeout")):
            return ProviderFailure("transient", None, retry_after, "transport")
    return ProviderFailure("permanent", status, retry_after, "unclassified")


def provider_message(exc: BaseException, *, model: str, key_variable: str | None, redact: RedactFn) -> str:
    """The provider's own reason, with every configured key redacted and the key's variable named as configured."""
    text = redact(f"{type(exc).__name__}: {exc}")
    text = _KEY_VARIABLE.sub(key_variable or "api_key_env (not set for this model)", text)
    failure = classify(exc)
    prefix = f"{model}" + (f" (HTTP {failure.status})" if failure.status else "")
    if failure.reason == "auth":
        where = f"the environment variable {key_variable}" if key_variable else "no variable (api_key_env is not set)"
        return f"{prefix}: the provider refused the API key read from {where}: {text}"
    return f"{prefix}: {text}"


class RedactFn:
    """Replaces each configured secret in a text with ``[redacted]`` (longest first)."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text


def project_error(exc: BaseException) -> DspyrtError | None:
    """The project's error behind what DSPy raised: DSPy wraps what an LM engine raises (``LMUnexpectedError``
    from the bus engine's ``RemoteError``), so the stable code is found down the cause chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, DspyrtError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# ------------------------------------------------------------------------------ errors on the bus


class ProviderError(DspyrtError):
    """A provider refused a call for good (bad key, unknown model, bad request): the task fails at once."""

    code = PROVIDER_ERROR


class ProviderUnreliableError(PermanentError):
    """Too many calls of a run failed even after retries and fallback: its scores would measure provider luck."""

    code = PROVIDER_UNRELIABLE


class TransientProviderError(RetryableError):
    """A provider failure worth retrying (timeouts, connection trouble, 5xx)."""

    code = "provider_unavailable"


class RateLimitedError(RetryableError):
    """The provider (or our own per-model limit) says slow down."""

    code = "rate_limited"


class AllModelsFailedError(DspyrtError):
    """Every model of the chain failed transiently, after its retries."""

    code = ALL_MODELS_FAILED


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen) and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _status(exc: BaseException) -> int | None:
    for current in _chain(exc):
        for name in ("status", "status_code"):
            value = getattr(current, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
                return value
    return None


def _retry_after(exc: BaseException) -> float | None:
    """The provider's retry-after hint in seconds (``retry_after`` on DSPy's and lm15's errors, or ``delay``)."""
    for current in _chain(exc):
        for name in ("retry_after", "delay"):
            hint = getattr(current, name, None)
            if isinstance(hint, int | float) and not isinstance(hint, bool) and math.isfinite(hint) and hint >= 0:
                return float(hint)
    return None
