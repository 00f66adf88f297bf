"""Tracing: one trace per request, W3C trace context carried in gRPC metadata (per RPC) and
in each round's message (per round), exporters chosen by the standard OTEL_* variables.

OTEL_TRACES_EXPORTER: otlp, console or none (a comma list is allowed). When it is unset,
OTLP is used if OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set, else nothing is
exported. OTLP needs the `opentelemetry-exporter-otlp` package; without it a warning says so
and the console exporter is used instead. AERIE_TRACE_FILE=PATH also writes every finished
span as one JSON line (the demo reads its per-round summary from these files).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping, Sequence

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

TRACER_NAME = "aerie"


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


class JsonLinesExporter(SpanExporter):
    """Finished spans as JSON lines: name, ids, parent, times (ns), attributes, service."""

    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in shutdown
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            for s in spans:
                row = {
                    "name": s.name,
                    "trace_id": f"{s.context.trace_id:032x}",
                    "span_id": f"{s.context.span_id:016x}",
                    "parent_id": f"{s.parent.span_id:016x}" if s.parent else None,
                    "start_ns": s.start_time,
                    "end_ns": s.end_time,
                    "service": s.resource.attributes.get("service.name"),
                    "attributes": dict(s.attributes or {}),
                }
                self._file.write(json.dumps(row) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def _otlp_exporter() -> SpanExporter | None:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    try:
        if protocol.startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        return None
    return OTLPSpanExporter()


def setup_tracing(service_name: str) -> TracerProvider | None:
    """Install a tracer provider for this process, unless one is installed already (tests
    install their own with an in-memory exporter). Returns the provider installed here."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return None
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    wanted = os.environ.get("OTEL_TRACES_EXPORTER")
    if wanted is None:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        wanted = "otlp" if endpoint else "none"
    for kind in (k.strip().lower() for k in wanted.split(",") if k.strip()):
        if kind == "otlp":
            exporter = _otlp_exporter()
            if exporter is None:
                print(
                    f"{name}: OTEL_TRACES_EXPORTER=otlp but the package opentelemetry-exporter-otlp is not "
                    "installed; exporting spans to the console instead (pip install opentelemetry-exporter-otlp)",
                    file=sys.stderr, flush=True,
                )
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
            else:
                provider.add_span_processor(BatchSpanProcessor(exporter))
        elif kind == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        elif kind != "none":
            print(f"{name}: unknown OTEL_TRACES_EXPORTER {kind!r} ignored (use otlp, console or none)",
                  file=sys.stderr, flush=True)
    path = os.environ.get("AERIE_TRACE_FILE")
    if path:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    trace.set_tracer_provider(provider)
    return provider


def inject(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """The W3C trace context (traceparent, tracestate) of the current or given context."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


def metadata(ctx: otel_context.Context | None = None) -> list[tuple[str, str]]:
    return list(inject(ctx).items())


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    return propagate.extract(dict(carrier))


def extract_grpc(context: grpc.ServicerContext) -> otel_context.Context:
    return extract({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})


def trace_id_hex(span: trace.Span) -> str:
    return f"{span.get_span_context().trace_id:032x}"
