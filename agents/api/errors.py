"""The Python API's errors, in the project's one tree (rooted at :class:`dspyrt.bus.errors.DspyrtError`)::

    DspyrtError
    ├── MessageValidationError
    │   └── SignatureNotSupported   code "unsupported_signature" (refused on the client: nothing was sent)
    └── TaskFailed                  code and message of the failed task's error record
        └── ProviderError           the LM provider failed (provider_error, provider_unreliable, all_models_failed,
                                    rate_limited, provider_unavailable)

A verb that cannot reach the system raises ``BusUnavailableError``; invalid arguments ``MessageValidationError``
(every field error listed, before anything is sent); a wait past its ``timeout`` the builtin ``TimeoutError`` (the
task goes on).
"""

from __future__ import annotations

from dspyrt.agents.lm.errors import PROVIDER_ERROR, PROVIDER_UNRELIABLE, TRANSIENT_CALL_CODES
from dspyrt.bus import TaskRecord, TaskStatus
from dspyrt.bus.errors import DspyrtError, ErrorBody, FieldError, MessageValidationError

PROVIDER_CODES = frozenset({PROVIDER_ERROR, PROVIDER_UNRELIABLE, *TRANSIENT_CALL_CODES})


class SignatureNotSupported(MessageValidationError):
    """A program that a declarative spec cannot express (say, a field typed ``dict[str, int]``); ``field_errors``
    names each field and why. Raised before anything is submitted."""

    code = "unsupported_signature"


class TaskFailed(DspyrtError):
    """A task that ended failed or dead: the ``code`` and ``message`` of its error record, its ``field_errors``,
    ``task_id``, ``kind`` and final ``status``."""

    def __init__(self, record: TaskRecord) -> None:
        error = record.error or ErrorBody(code=record.status.value, message=f"task ended {record.status.value}")
        super().__init__(f"task {record.id} ({record.kind}) {record.status.value}: {error.message}", code=error.code)
        self.task_id = record.id
        self.kind = record.kind
        self.status: TaskStatus = record.status
        self.field_errors: list[FieldError] = list(error.field_errors)

    def to_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, field_errors=self.field_errors)


class ProviderError(TaskFailed):
    """A task failed because the LM provider did (refused the request, failed too often, or every model of the
    fallback chain failed)."""


def task_failure(record: TaskRecord) -> TaskFailed:
    """The error a failed or dead task's record stands for."""
    code = record.error.code if record.error else ""
    return ProviderError(record) if code in PROVIDER_CODES else TaskFailed(record)
