"""Payload encoding: every payload is a pydantic model, checked on the way in and sized on the way out."""

from __future__ import annotations

from typing import TypeVar

import nats.errors
from pydantic import BaseModel, ConfigDict, ValidationError

from dspyrt.bus.errors import ErrorBody, FieldError, MessageValidationError, PayloadTooLargeError

M = TypeVar("M", bound=BaseModel)

# Headers reserved for the runtime; values are plain strings.
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
MSG_ID_HEADER = "Nats-Msg-Id"
TASK_ID_HEADER = "Dspyrt-Task-Id"
CLIENT_HEADER = "Dspyrt-Client"
RECORD_REV_HEADER = "Dspyrt-Record-Rev"

# Leave room for headers under the server's max_payload.
HEADER_ALLOWANCE = 4096
# An error body lists at most this many field errors, so a huge malformed payload cannot make an error
# reply (or dead letter, or task record) too large to send.
MAX_FIELD_ERRORS = 50
# Past this many, none are listed: pydantic builds every error as a dict before any can be sliced (80,000
# unknown keys in 1 MB: 150 ms of the event loop), and no real mistake makes that many.
LISTED_ERRORS_LIMIT = 1000


class Message(BaseModel):
    """Base for payload models: unknown fields are rejected so typos surface as errors."""

    model_config = ConfigDict(extra="forbid")


class Empty(Message):
    """An empty request or reply."""


# Error texts may quote hostile input (an unknown key, a value): each piece is clipped so an error reply
# always fits in a message, whatever it was given.
MAX_ERROR_TEXT = 300


def clip(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    return text if len(text) <= limit else f"{text[: limit - 15]}… ({len(text)} chars)"


def field_errors_of(exc: ValidationError) -> list[FieldError]:
    """The first ``MAX_FIELD_ERRORS`` errors (``exc.error_count()`` has the total), each clipped."""
    if exc.error_count() > LISTED_ERRORS_LIMIT:
        return []
    return [
        FieldError(
            loc=clip(".".join(str(p) for p in err["loc"]) or "(body)", 200),
            message=clip(err["msg"]),
            type=clip(err["type"], 100),
        )
        for err in exc.errors(include_url=False)[:MAX_FIELD_ERRORS]
    ]


def decode(model: type[M], data: bytes) -> M:
    """Parse ``data`` as ``model``; raise :class:`MessageValidationError` with field errors."""
    try:
        return model.model_validate_json(data or b"{}")
    except ValidationError as exc:
        errors = field_errors_of(exc)
        first = errors[0] if errors else None
        where = f" ({first.loc}: {first.message})" if first else " (too many to list)"
        raise MessageValidationError(
            f"{model.__name__} payload is invalid: {exc.error_count()} error(s){where}", errors
        ) from exc


def encode(model: BaseModel) -> bytes:
    return model.model_dump_json().encode()


def check_size(data: bytes, limit: int, what: str = "payload") -> bytes:
    """Refuse to publish what the server would reject, naming the size and the limit."""
    usable = max(limit - HEADER_ALLOWANCE, 0)
    if len(data) > usable:
        raise PayloadTooLargeError(len(data), usable, what)
    return data


def error_body(exc: BaseException) -> ErrorBody:
    """The wire form of any exception: ours keep their code, the rest become ``internal``."""
    to_body = getattr(exc, "to_body", None)
    if callable(to_body):
        body = to_body()
        if isinstance(body, ErrorBody):
            return ErrorBody(
                code=clip(body.code, 100),
                message=clip(body.message, 2 * MAX_ERROR_TEXT),
                field_errors=[
                    FieldError(loc=clip(f.loc, 200), message=clip(f.message), type=clip(f.type, 100))
                    for f in body.field_errors[:MAX_FIELD_ERRORS]
                ],
            )
    if isinstance(exc, nats.errors.MaxPayloadError):
        # nats-py's message names neither the message nor the limit; the caller's context (the task) names the rest.
        return ErrorBody(
            code="payload_too_large",
            message="a message this task wrote was over the server's max_payload (retrying would not help): keep "
            "large data in datasets ('dspyrt datasets put') and large results in the object store",
        )
    return ErrorBody(code="internal", message=clip(f"{type(exc).__name__}: {exc}", 2 * MAX_ERROR_TEXT))
