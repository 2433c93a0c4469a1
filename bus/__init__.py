"""The NATS layer: connection, embedded server, subjects, messages, durable tasks, events, trace context.

Nothing here knows about DSPy or agents.
"""

from bus.connection import Bus, ConnectionOptions, TlsOptions
from bus.errors import (
    BusUnavailableError,
    ConfigurationError,
    DspyrtError,
    ErrorBody,
    FieldError,
    MessageValidationError,
    NotFoundError,
    PayloadTooLargeError,
    PermanentError,
    RemoteError,
    RetryableError,
    TaskError,
    UnknownKindError,
)
from bus.events import Event, EventConsumer, publish_event
from bus.messages import Empty, Message, decode, encode
from bus.server import EmbeddedServer, free_port
from bus.streams import StreamLayout, StreamOutcome, ensure_streams
from bus.subjects import Subjects
from bus.tasks import (
    DeadLetter,
    TaskEnvelope,
    TaskRecord,
    TaskRun,
    TaskStatus,
    TaskStore,
    TaskWorker,
    WorkerOptions,
    submit_task,
    wait_for_task,
)

__all__ = [
    "Bus",
    "BusUnavailableError",
    "ConfigurationError",
    "ConnectionOptions",
    "DeadLetter",
    "DspyrtError",
    "EmbeddedServer",
    "Empty",
    "ErrorBody",
    "Event",
    "EventConsumer",
    "FieldError",
    "Message",
    "MessageValidationError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermanentError",
    "RemoteError",
    "RetryableError",
    "StreamLayout",
    "StreamOutcome",
    "Subjects",
    "TaskEnvelope",
    "TaskError",
    "TaskRecord",
    "TaskRun",
    "TaskStatus",
    "TaskStore",
    "TaskWorker",
    "TlsOptions",
    "UnknownKindError",
    "WorkerOptions",
    "decode",
    "encode",
    "ensure_streams",
    "free_port",
    "publish_event",
    "submit_task",
    "wait_for_task",
]
