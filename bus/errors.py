"""The project's one error tree.

Every error that crosses the bus carries a stable ``code`` and a human ``message``
(plus ``field_errors`` for validation problems)::

    DspyrtError
    ├── MessageValidationError   code "invalid_message"   (bad payload; field_errors)
    ├── PayloadTooLargeError     code "payload_too_large" (names the size and the limit)
    ├── ConfigurationError       code "invalid_config"
    ├── NotFoundError            code "not_found"
    ├── UnknownKindError         code "unknown_kind"      (no worker serves a task kind: nothing was submitted)
    ├── BusUnavailableError      code "unavailable"       (no NATS reachable)
    ├── RemoteError              code from the remote side (an agent answered with an error)
    └── TaskError                a task handler's failure
        ├── RetryableError       code "retryable"         (nak with delay, try again)
        └── PermanentError       code "permanent"         (dead-letter at once)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import nats.errors
from pydantic import BaseModel, Field


class FieldError(BaseModel):
    """One field that failed validation: where, what was wrong."""

    loc: str
    message: str
    type: str = "value_error"


class ErrorBody(BaseModel):
    """The JSON body of an error reply or a failed task's error record."""

    code: str
    message: str
    field_errors: list[FieldError] = Field(default_factory=list)


class DspyrtError(Exception):
    """Root of every error this project raises on purpose."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, field_errors=getattr(self, "field_errors", []))

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class MessageValidationError(DspyrtError):
    """A payload that does not match its model."""

    code = "invalid_message"

    def __init__(self, message: str, field_errors: list[FieldError] | None = None) -> None:
        super().__init__(message)
        self.field_errors = field_errors or []

    def to_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, field_errors=self.field_errors)


class PayloadTooLargeError(DspyrtError):
    code = "payload_too_large"

    def __init__(self, size: int, limit: int, what: str = "payload") -> None:
        super().__init__(f"{what} is {size} bytes, over the server's limit of {limit} bytes")
        self.size = size
        self.limit = limit


class ConfigurationError(DspyrtError):
    code = "invalid_config"


class NotFoundError(DspyrtError):
    code = "not_found"


class UnknownKindError(DspyrtError):
    """No worker serves this task kind (no durable consumer for it on the task stream): nothing was submitted."""

    code = "unknown_kind"

    def __init__(self, kind: str, served: Iterable[str], stream: str) -> None:
        self.kind = kind
        self.served = tuple(sorted(served))
        message = (
            f"no worker serves task kind {kind!r} (stream {stream} has no consumer for it); nothing was submitted. "
            f"Served kinds: {', '.join(self.served) if self.served else 'none (no worker has started yet)'}"
        )
        close = difflib.get_close_matches(kind, self.served, n=1)
        if close:
            message += f". Did you mean {close[0]!r}?"
        super().__init__(message)


class BusUnavailableError(DspyrtError):
    code = "unavailable"


class RemoteError(DspyrtError):
    """An agent answered a request with an error body."""

    def __init__(self, body: ErrorBody) -> None:
        super().__init__(body.message, code=body.code)
        self.field_errors = body.field_errors

    def to_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, field_errors=self.field_errors)

    @classmethod
    def from_json(cls, data: Any) -> RemoteError:
        return cls(ErrorBody.model_validate(data))


class TaskError(DspyrtError):
    """A task handler's failure; its subclass says whether to retry."""


class RetryableError(TaskError):
    """Try the task again later (``delay`` seconds, or the worker's backoff)."""

    code = "retryable"

    def __init__(self, message: str, *, delay: float | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.delay = delay


class PermanentError(TaskError):
    """Retrying cannot help: the task is failed and dead-lettered at once."""

    code = "permanent"


# Codes that retrying cannot heal: bad input, something missing or corrupt, configuration, a provider refusing
# the request, a spent budget. Whichever agent or error reply they come from, a task failing with one fails at once.
PERMANENT_CODES = frozenset(
    {
        "invalid_message",
        "not_found",
        "invalid_config",
        "corrupt_artifact",
        "no_eligible_model",
        "provider_error",
        "provider_unreliable",
        "budget_exhausted",
        "payload_too_large",
        "dataset_not_found",
        "corrupt_dataset",
    }
)


def is_permanent(exc: BaseException) -> bool:
    """Whether a task failing with ``exc`` is failed at once rather than retried (a RetryableError never is)."""
    if isinstance(exc, RetryableError):
        return False
    if isinstance(exc, nats.errors.MaxPayloadError):  # the same message would be too large again
        return True
    return isinstance(exc, PermanentError) or (isinstance(exc, DspyrtError) and exc.code in PERMANENT_CODES)
