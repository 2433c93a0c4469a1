"""Telemetry setup, done once per process: tracer and meter providers, exporters, span-drop accounting.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) set, spans go over OTLP/HTTP to that
collector; otherwise they are appended to ``<state_dir>/traces/spans-<pid>.jsonl`` so ``dspyrt traces`` works
offline. Every standard ``OTEL_*`` variable (service name, resource attributes, sampler, BSP sizes) is honoured
by the SDK itself. The batch queue defaults to 65536 spans instead of 2048, and drops are counted through the
SDK's own ``otel.sdk.processor.span.processed`` metric (``error.type=queue_full``).

Instrumentors installed as ``opentelemetry_instrumentor`` entry points are turned on by name (configuration:
``instrumentations``), e.g. openinference's DSPy instrumentation, so LM calls appear inside each task's trace.
Work submitted to a thread pool runs in the submitter's trace context (see ``propagate_context_to_thread_pools``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic_core
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from dspyrt.bus.errors import ConfigurationError
from dspyrt.runtime.plugins import EntryPointRegistry

DEFAULT_SPAN_QUEUE = 65536
DROP_METRIC = "otel.sdk.processor.span.processed"
INSTRUMENTOR_GROUP = "opentelemetry_instrumentor"

log = logging.getLogger("dspyrt.telemetry")


def span_to_dict(span: ReadableSpan) -> dict[str, object]:
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
        "span_id": f"{ctx.span_id:016x}" if ctx else None,
        "parent_id": f"{parent.span_id:016x}" if parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "start": span.start_time,
        "end": span.end_time,
        "status": span.status.status_code.name,
        # The error's text, as OTLP exports it too (error bodies are redacted before they reach a span).
        "status_message": span.status.description,
        "service": span.resource.attributes.get("service.name"),
        "attributes": dict(span.attributes or {}),
    }


class JsonlSpanExporter(SpanExporter):
    """One JSON line per span, one file per process (no interleaving between processes)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"spans-{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        # pydantic-core's encoder: about a third less CPU per span than json.dumps, on the export thread that
        # shares the GIL with the event loop (bench_foundation --profile rr-traced).
        lines = b"".join(pydantic_core.to_json(span_to_dict(s), fallback=str) + b"\n" for s in spans)
        with self._lock, open(self.path, "ab") as fh:
            fh.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def otlp_configured() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


@dataclass
class Telemetry:
    """The process's providers and where its spans go."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    span_destination: str
    _self_metrics: InMemoryMetricReader
    # The instrumentors turned on, by entry-point name.
    instrumentations: list[str] = field(default_factory=list)

    def dropped_spans(self) -> int:
        """Spans the batch queue had to drop since start (0 unless the exporter cannot keep up)."""
        data = self._self_metrics.get_metrics_data()
        dropped = 0
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name != DROP_METRIC:
                        continue
                    for point in metric.data.data_points:
                        if (point.attributes or {}).get("error.type"):
                            dropped += int(getattr(point, "value", 0))
        return dropped

    def flush(self) -> None:
        self.tracer_provider.force_flush()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


_lock = threading.Lock()
_current: Telemetry | None = None


_pool_submit = ThreadPoolExecutor.submit


def propagate_context_to_thread_pools() -> None:
    """Run work submitted to any ``ThreadPoolExecutor`` in the submitter's trace context. Idempotent.

    DSPy runs a program's examples on its own thread pools (Evaluate, the optimizers, Parallel), whose threads start
    with an empty context: every span made there (openinference's Predict and LM spans, our LM hops) began a trace
    of its own instead of joining the task's. opentelemetry-instrumentation-threading does the same for the
    executor; it pins exact OpenTelemetry versions, so this one patch stays here instead.
    """

    def submit_in_context(
        self: ThreadPoolExecutor, fn: Callable[..., object], /, *args: object, **kwargs: object
    ) -> Future[object]:
        submitter = otel_context.get_current()

        def run(*a: object, **kw: object) -> object:
            token = otel_context.attach(submitter)
            try:
                return fn(*a, **kw)
            finally:
                otel_context.detach(token)

        return _pool_submit(self, run, *args, **kwargs)

    ThreadPoolExecutor.submit = submit_in_context  # type: ignore[assignment,method-assign]


def instrument(names: Iterable[str], tracer_provider: TracerProvider) -> list[str]:
    """Turn on the named installed instrumentors; return the names turned on (a missing one is skipped)."""
    wanted = set(names)
    if not wanted:
        return []
    try:
        installed = EntryPointRegistry(INSTRUMENTOR_GROUP, "instrumentation", _instrumentor_class)
    except ConfigurationError as exc:  # two distributions claim one name: which one is meant is unknown
        log.warning("instrumentation not turned on: %s", exc.message)
        return []
    turned_on = []
    for name in sorted(wanted):
        if name not in installed:
            log.debug("instrumentation %s is not installed", name)
            continue
        try:
            instrumentor = installed.get(name)()
            if not instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.instrument(tracer_provider=tracer_provider)
        except Exception as exc:  # a broken optional instrumentor must not stop the process
            log.warning("instrumentation %s not turned on: %s", name, exc)
            continue
        turned_on.append(name)
    return turned_on


def _instrumentor_class(loaded: Any) -> Callable[[], Any]:
    if not callable(loaded):
        raise TypeError("is not an instrumentor class")
    instrumentor: Callable[[], Any] = loaded
    return instrumentor


def setup_telemetry(state_dir: Path, service_name: str = "dspyrt", instrumentations: Iterable[str] = ()) -> Telemetry:
    """Install the global providers on first call; later calls in the same process return the same ones."""
    global _current
    with _lock:
        if _current is not None:
            return _current
        os.environ.setdefault("OTEL_SERVICE_NAME", service_name)
        resource = Resource.create()
        self_metrics = InMemoryMetricReader()
        readers: list[MetricReader] = [self_metrics]
        if otlp_configured() or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)

        exporter: SpanExporter
        if otlp_configured():
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
            destination = (
                os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
            )
        else:
            jsonl = JsonlSpanExporter(Path(state_dir) / "traces")
            exporter = jsonl
            destination = str(jsonl.path)
        queue = int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_SPAN_QUEUE))
        processor = BatchSpanProcessor(exporter, max_queue_size=queue, meter_provider=meter_provider)
        tracer_provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER, read by the SDK
        tracer_provider.add_span_processor(processor)
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        propagate_context_to_thread_pools()
        _current = Telemetry(
            tracer_provider, meter_provider, destination, self_metrics, instrument(instrumentations, tracer_provider)
        )
        return _current


def current_telemetry() -> Telemetry | None:
    return _current
