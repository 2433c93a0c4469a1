"""The NATS layer: connection, embedded server, subjects, messages, durable tasks, events, trace context.

Nothing here knows about DSPy or agents.
"""

from dspyrt.bus.connection import Bus, ConnectionOptions, TlsOptions
from dspyrt.bus.errors import (
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
from dspyrt.bus.events import Event, EventConsumer, EventData, publish_event
from dspyrt.bus.messages import Empty, Message, decode, encode
from dspyrt.bus.server import EmbeddedServer, free_port
from dspyrt.bus.streams import StreamLayout, StreamOutcome, ensure_streams
from dspyrt.bus.subjects import Subjects
from dspyrt.bus.tasks import (
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
    "EventData",
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
