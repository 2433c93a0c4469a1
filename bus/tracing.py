"""W3C trace context in NATS headers, and spans named per the OpenTelemetry messaging conventions.

Producer side: ``send <subject>`` (kind PRODUCER, or CLIENT for a request awaiting a reply).
Consumer side: ``process <subject>`` (kind CONSUMER, or SERVER for a request being answered), continuing
the trace found in the ``traceparent`` / ``tracestate`` headers. Reply inboxes never appear in span names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("dspyrt.bus")
_live_for: tuple[int, bool] = (0, False)
# What a hop gets when nothing records and no caller's trace is to be passed on: reusable, no generator per hop.
_NO_SPAN: AbstractContextManager[Span] = nullcontext(trace.INVALID_SPAN)


def live() -> bool:
    """Whether spans can be recorded at all (an SDK provider whose sampler is not always-off).

    When nothing can record, hops skip span creation; an upstream trace context is still passed on.
    Cached per provider object, so installing the SDK later is noticed.
    """
    global _live_for
    provider = trace.get_tracer_provider()
    if _live_for[0] != id(provider):
        sampler = getattr(provider, "sampler", None)
        # "AlwaysOffSampler" or "ParentBased{root:AlwaysOffSampler,...}": no trace starts here.
        recording = (
            sampler is not None
            and "root:AlwaysOffSampler" not in sampler.get_description()
            and sampler.get_description() != "AlwaysOffSampler"
        )
        _live_for = (id(provider), recording)
    return _live_for[1]


def _sampled_upstream(headers: dict[str, str] | None) -> bool:
    """A sampled caller's trace is recorded even where no trace would start (parent-based sampling)."""
    if not headers or not headers.get(TRACEPARENT, "").endswith("-01"):
        return False
    return hasattr(trace.get_tracer_provider(), "sampler")


TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Write the current trace context into ``headers`` (in place) and return them."""
    if live() or trace.get_current_span().get_span_context().is_valid:
        _propagator.inject(headers)
    return headers


def extract(headers: dict[str, str] | None) -> otel_context.Context:
    """The context carried by ``headers``; a malformed or missing traceparent starts a new trace."""
    if not headers or TRACEPARENT not in headers:
        return otel_context.Context()
    return _propagator.extract(headers)


def _attributes(subject: str, operation: str, size: int | None, message_id: str | None) -> dict[str, str | int]:
    attrs: dict[str, str | int] = {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.name": operation,
        "messaging.operation.type": operation,
    }
    if size is not None:
        attrs["messaging.message.body.size"] = size
    if message_id:
        attrs["messaging.message.id"] = message_id
    return attrs


def send_span(
    subject: str, *, size: int | None = None, message_id: str | None = None, expects_reply: bool = False
) -> AbstractContextManager[Span]:
    """A producer span; inject its context into the outgoing headers inside the ``with``."""
    if not live():
        return _NO_SPAN
    kind = SpanKind.CLIENT if expects_reply else SpanKind.PRODUCER
    span = _tracer.start_span(f"send {subject}", kind=kind, attributes=_attributes(subject, "send", size, message_id))
    return _CurrentSpan(span, otel_context.get_current(), record_exception=True)


class _CurrentSpan:
    """Makes ``span`` current inside the ``with`` (on top of ``parent``) and ends it after.

    What ``start_as_current_span`` does, as one plain object instead of two generator-based context managers:
    two spans per hop made those a tenth of a traced request's CPU (bench_foundation ``--profile rr-traced``).
    """

    __slots__ = ("_parent", "_record_exception", "_span", "_token")

    def __init__(self, span: Span, parent: otel_context.Context, *, record_exception: bool) -> None:
        self._span = span
        self._parent = parent
        self._record_exception = record_exception

    def __enter__(self) -> Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span, self._parent))
        return self._span

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            if exc is not None and self._record_exception and isinstance(exc, Exception):
                self._span.record_exception(exc)
                self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            otel_context.detach(self._token)
            self._span.end()


def process_span(
    subject: str,
    headers: dict[str, str] | None,
    *,
    size: int | None = None,
    message_id: str | None = None,
    consumer_group: str | None = None,
    is_request: bool = False,
) -> AbstractContextManager[Span]:
    """A consumer span that continues the sender's trace (not recording: the sender's trace is passed on)."""
    if not live() and not _sampled_upstream(headers):
        return _NO_SPAN if not headers or TRACEPARENT not in headers else _forwarded(headers)
    attrs = _attributes(subject, "process", size, message_id)
    if consumer_group:
        attrs["messaging.consumer.group.name"] = consumer_group
    kind = SpanKind.SERVER if is_request else SpanKind.CONSUMER
    parent = extract(headers)
    span = _tracer.start_span(f"process {subject}", context=parent, kind=kind, attributes=attrs)
    return _CurrentSpan(span, parent, record_exception=False)


@contextmanager
def _forwarded(headers: dict[str, str] | None) -> Iterator[Span]:
    token = otel_context.attach(extract(headers))  # forward the caller's trace even when not recording
    try:
        yield trace.INVALID_SPAN
    finally:
        otel_context.detach(token)


def mark_error(span: Span, code: str, message: str) -> None:
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR, message))
        span.set_attribute("error.type", code)


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None
