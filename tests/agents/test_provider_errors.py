"""The provider error taxonomy (dspyrt.agents.lm.errors) on DSPy's own error classes and plain HTTP/network errors."""

from __future__ import annotations

import pytest
from dspy import lm15
from dspy.utils.exceptions import (
    ContextWindowExceededError,
    LMAuthError,
    LMBillingError,
    LMInvalidRequestError,
    LMProviderError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
    LMUnexpectedError,
    LMUnsupportedModelError,
)

from dspyrt.agents.lm.errors import RedactFn, classify, provider_message

pytestmark = pytest.mark.timeout(10)


class HttpError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (LMRateLimitError("slow down", status=429, retry_after=2.0), "rate_limited"),
        (LMServerError("boom", status=500), "transient"),
        (LMServerError("overloaded", status=529), "transient"),
        (LMTimeoutError("took too long"), "transient"),
        (LMTransportError("connection refused"), "transient"),
        (LMAuthError("Incorrect API key", status=401), "permanent"),
        (LMAuthError("forbidden", status=403), "permanent"),
        (LMBillingError("quota", status=402), "permanent"),
        (LMUnsupportedModelError("no such model", status=404), "permanent"),
        (LMInvalidRequestError("bad request", status=400), "permanent"),
        (ContextWindowExceededError(model="openai/x"), "permanent"),
        (LMProviderError("teapot", status=418), "permanent"),
        (LMProviderError("bad gateway", status=502), "transient"),
        (lm15.RateLimitError("slow down", retry_after=1.0), "rate_limited"),
        (HttpError(503), "transient"),
        (HttpError(429), "rate_limited"),
        (HttpError(401), "permanent"),
        (ConnectionRefusedError("refused"), "transient"),
        (TimeoutError(), "transient"),
        (ValueError("something we cannot name"), "permanent"),
    ],
)
def test_each_failure_has_one_kind(error: Exception, kind: str) -> None:
    assert classify(error).kind == kind


def test_the_cause_chain_is_read_through_dspys_wrappers() -> None:
    try:
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as inner:
            raise LMUnexpectedError("engine failed") from inner
    except LMUnexpectedError as outer:
        assert classify(outer).kind == "transient"
    try:
        try:
            raise lm15.RateLimitError("slow down", retry_after=4.0)
        except lm15.RateLimitError as inner:
            raise LMRateLimitError("slow down", model="openai/x") from inner
    except LMRateLimitError as outer:
        failure = classify(outer)
    assert (failure.kind, failure.retry_after) == ("rate_limited", 4.0)


def test_an_auth_message_names_the_configured_variable_and_hides_the_key() -> None:
    key = "sk-secret-123456"
    error = LMAuthError(f"Incorrect API key provided: {key}. Set OPENAI_API_KEY to a valid key.", status=401)
    message = provider_message(error, model="openai/x", key_variable="ACME_LLM_KEY", redact=RedactFn([key]))
    assert key not in message and "[redacted]" in message
    assert "OPENAI_API_KEY" not in message
    assert "ACME_LLM_KEY" in message and "HTTP 401" in message and message.startswith("openai/x")
