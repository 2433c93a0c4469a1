"""Telemetry setup, done once per process: tracer and meter providers, exporters, span-drop accounting.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) set, spans go over OTLP/HTTP to that
collector; otherwise they are appended to ``<state_dir>/traces/spans-<pid>.jsonl`` so ``dspyrt traces`` works
offline. Every standard ``OTEL_*`` variable (service name, resource attributes, sampler, BSP sizes) is honoured
by the SDK itself. The batch queue defaults to 65536 spans instead of 2048, and drops are counted through the
SDK's own ``otel.sdk.processor.span.processed`` metric (``error.type=queue_full``).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

DEFAULT_SPAN_QUEUE = 65536
DROP_METRIC = "otel.sdk.processor.span.processed"


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
        lines = "".join(json.dumps(span_to_dict(s), default=str) + "\n" for s in spans)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
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


def setup_telemetry(state_dir: Path, service_name: str = "dspyrt") -> Telemetry:
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
        _current = Telemetry(tracer_provider, meter_provider, destination, self_metrics)
        return _current


def current_telemetry() -> Telemetry | None:
    return _current
